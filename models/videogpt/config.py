"""VideoGPT's static configurations: the video VQ-VAE and the GPT over its codes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fmm.nn import TransformerConfig
from fmm.nn.conv3d import triple

Triple = tuple[int, int, int]


@dataclass(frozen=True, kw_only=True)
class VideoVQVAEConfig:
    """A 3-d conv VQ-VAE over ``[B, in_channels, frames, image_size, image_size]`` videos.

    The encoder runs one SAME-padded conv per ``down_kernels`` / ``down_strides`` entry (ReLU
    between), then ``encoder_kernel`` at ``encoder_stride`` to ``attn_hidden`` channels,
    ``res_layers`` axial-attention residual blocks, batch norm, ReLU and a 1x1x1 conv to
    ``code_dim``; the decoder mirrors it with transposed convs (TorchMultimodal's
    ``video_vqvae`` builder arguments, renamed). ``decay``, ``eps``, ``dead_threshold``:
    the EMA codebook's (:mod:`fmm.nn.codebook`): a code whose EMA count per batch falls below
    ``dead_threshold`` restarts at an encoder output (TorchMultimodal's usage threshold of 1,
    so short runs use their codebook); ``bn_momentum``: the running statistics'.
    """

    in_channels: int = 3
    frames: int = 8
    image_size: int = 32
    down_kernels: tuple[Triple, ...] = ((4, 4, 4), (4, 4, 4))
    down_strides: tuple[Triple, ...] = ((2, 2, 2), (1, 2, 2))
    encoder_kernel: Triple = (3, 3, 3)
    encoder_stride: Triple = (1, 1, 1)
    encoder_hidden: int = 64
    attn_hidden: int = 64
    decoder_hidden: int = 64
    res_layers: int = 2
    heads: int = 2
    codebook_size: int = 256
    code_dim: int = 32
    decay: float = 0.99
    eps: float = 1e-5
    dead_threshold: float = 1.0
    commitment: float = 0.25
    bn_momentum: float = 0.1

    def __post_init__(self) -> None:
        # A config read back from config.json holds lists: keep it hashable (tuples).
        for name in ("down_kernels", "down_strides"):
            object.__setattr__(self, name, tuple(tuple(v) for v in getattr(self, name)))
        for name in ("encoder_kernel", "encoder_stride"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("in_channels", "frames", "image_size", "encoder_hidden", "attn_hidden",
                     "decoder_hidden", "heads", "codebook_size", "code_dim"):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if len(self.down_kernels) != len(self.down_strides) or not self.down_kernels:
            raise ValueError(
                "down_kernels and down_strides must be non-empty and of one length, got "
                f"{len(self.down_kernels)} and {len(self.down_strides)}"
            )
        for name in ("down_kernels", "down_strides"):
            for v in getattr(self, name):
                triple(v, name)
        triple(self.encoder_kernel, "encoder_kernel")
        triple(self.encoder_stride, "encoder_stride")
        if self.res_layers < 0:
            raise ValueError(f"res_layers must be >= 0, got {self.res_layers}")
        if self.attn_hidden % self.heads or self.attn_hidden < 2:
            raise ValueError(
                f"attn_hidden={self.attn_hidden} must be >= 2 and divisible by heads={self.heads}"
            )
        for axis, size in zip("THW", (self.frames, self.image_size, self.image_size)):
            step = math.prod(s[("THW").index(axis)] for s in self.strides)
            if size % step:
                raise ValueError(
                    f"{axis} size {size} is not divisible by the encoder's total stride {step}"
                )

    @property
    def strides(self) -> tuple[Triple, ...]:
        """Every encoder conv's stride, the last one at the code resolution."""
        return (*self.down_strides, self.encoder_stride)

    @property
    def latent_shape(self) -> Triple:
        """The code grid ``(t, h, w)`` of one video."""
        sizes = [self.frames, self.image_size, self.image_size]
        for stride in self.strides:
            sizes = [d // s for d, s in zip(sizes, stride)]
        return tuple(sizes)  # type: ignore[return-value]

    @property
    def latent_len(self) -> int:
        return math.prod(self.latent_shape)

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (for ``config.json``)."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class VideoGPTConfig:
    """A decoder-only transformer over ``text_len`` caption tokens then ``latent_len`` video
    codes (TorchMultimodal's ``MultimodalGPT`` as MUGEN's text -> video runs it).

    Ids share one space: text ``[0, text_vocab)``, video code ``c`` at ``text_vocab + c``
    and the start token at ``text_vocab + video_vocab``. Text tokens are embedded at
    ``text_dim`` and video codes by the VQ-VAE's codebook (``code_dim``), each projected to
    ``width``; positions are broadcast per axis (``width`` must divide by 3 for the video).
    """

    text_vocab: int
    text_len: int
    video_vocab: int
    code_dim: int
    latent_shape: Triple
    text_dim: int = 64
    width: int = 96
    layers: int = 4
    heads: int = 4
    dropout: float = 0.0
    attn_dropout: float = 0.0
    norm_eps: float = 1e-5
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        for name in ("text_vocab", "text_len", "video_vocab", "code_dim", "text_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        object.__setattr__(self, "latent_shape", triple(tuple(self.latent_shape), "latent_shape"))
        if self.width % 3:
            raise ValueError(f"width={self.width} must be divisible by 3 (video positions)")
        self.transformer  # noqa: B018  (validates width, heads and layers now)

    @property
    def latent_len(self) -> int:
        return math.prod(self.latent_shape)

    @property
    def vocab_size(self) -> int:
        """Ids the model reads: text, video and the start token."""
        return self.text_vocab + self.video_vocab + 1

    @property
    def sos_id(self) -> int:
        return self.text_vocab + self.video_vocab

    @property
    def seq_len(self) -> int:
        """Longest input: the start token, a caption and every video code but the last."""
        return self.text_len + self.latent_len

    @property
    def transformer(self) -> TransformerConfig:
        return TransformerConfig(
            width=self.width, layers=self.layers, heads=self.heads, act="quick_gelu",
            norm_eps=self.norm_eps, dropout=self.dropout, attn_dropout=self.attn_dropout,
            attn_impl=self.attn_impl,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)


def video_vqvae_shapes() -> VideoVQVAEConfig:
    """8 x 32 x 32 moving-shapes clips -> 4 x 8 x 8 codes (256 per clip) of 128, width 32:
    small enough to train on a CPU in minutes."""
    return VideoVQVAEConfig(
        encoder_hidden=32, attn_hidden=32, decoder_hidden=32, codebook_size=128, code_dim=16
    )


def video_vqvae_tiny() -> VideoVQVAEConfig:
    """Contract-test size: 4 x 16 x 16 clips -> 2 x 4 x 4 codes, a few thousand params."""
    return VideoVQVAEConfig(
        frames=4, image_size=16, encoder_hidden=8, attn_hidden=8, decoder_hidden=8,
        res_layers=1, codebook_size=16, code_dim=4,
    )  # fmt: skip


def videogpt_shapes(*, text_vocab: int = 32, text_len: int = 8) -> VideoGPTConfig:
    """Caption -> 4 x 8 x 8 codes of :func:`video_vqvae_shapes`, width 96 x 4 layers (~0.5M)."""
    vq = video_vqvae_shapes()
    return VideoGPTConfig(
        text_vocab=text_vocab, text_len=text_len, video_vocab=vq.codebook_size,
        code_dim=vq.code_dim, latent_shape=vq.latent_shape,
    )  # fmt: skip


def videogpt_tiny(*, text_vocab: int = 16, text_len: int = 4) -> VideoGPTConfig:
    """Contract-test size over :func:`video_vqvae_tiny`'s codes: width 24 x 1 layer."""
    vq = video_vqvae_tiny()
    return VideoGPTConfig(
        text_vocab=text_vocab, text_len=text_len, video_vocab=vq.codebook_size,
        code_dim=vq.code_dim, latent_shape=vq.latent_shape, text_dim=8, width=24, layers=1,
        heads=2,
    )  # fmt: skip
