"""data2vec's static configuration and its presets (the paper's base sizes, a tiny one per modality)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fmm.nn import TransformerConfig
from fmm.nn.towers import TextConfig, ViTConfig

MODALITIES = ("image", "text", "audio")
TARGET_NORMS = ("instance", "layer")


@dataclass(frozen=True, kw_only=True)
class Data2VecConfig:
    """One data2vec model: a student encoder on masked input regresses, through a linear
    head, the average of its EMA teacher's top ``top_k`` block outputs on the unmasked
    input, at the masked positions only (Baevski et al., 2022).

    Inputs by ``modality``: ``"image"`` ``[B, in_channels, *input_size]``; ``"audio"`` a
    log-mel spectrogram ``[B, 1, frames, mels]`` (``input_size = (frames, mels)``), both cut
    in ``patch_size``² patches; ``"text"`` ids ``[B, seq]`` in ``[0, vocab_size)`` with
    ``seq <= context_length``.

    Encoder: ``width`` / ``layers`` / ``heads`` / ``mlp_dim`` / ``act`` / ``norm_eps`` /
    ``dropout``; ``norm_first``: pre-norm blocks and a final layer norm (ViT), or post-norm
    blocks with a layer norm over the embeddings (RoBERTa, the paper's text encoder).

    Masking: images and spectrograms replace ``mask_ratio`` of their patches (exactly
    ``patches - floor(patches * (1 - mask_ratio))``) by a learned mask embedding and keep
    the whole sequence; ``mask_block = (rows, cols)`` masks whole blocks of that many
    patches (BEiT-like blocks for images; ``(span, mel patches)`` masks time spans across
    every mel band for audio); ``(1, 1)`` is uniform random masking. Text hides each token
    with probability ``mask_ratio`` by ``mask_id`` (BERT's rate).

    Targets: each of the teacher's top ``top_k`` block outputs (the residual stream, before
    the final norm) normalised without affine params, ``target_norm="instance"`` over
    positions per channel (the paper's choice for speech; the default here for images too)
    or ``"layer"`` over channels per position (text), then averaged. Loss: smooth L1 with ``loss_beta`` (0: the
    squared error), mean over channels, over masked positions.

    Teacher EMA decay: ``tau_start`` rising linearly to ``tau_end`` over ``tau_steps``
    updates, then constant.
    """

    modality: str = "image"
    input_size: tuple[int, int] = (224, 224)
    in_channels: int = 3
    patch_size: int = 16
    vocab_size: int = 0
    context_length: int = 512
    mask_id: int = 0
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"
    norm_first: bool = True
    norm_eps: float = 1e-6
    dropout: float = 0.0
    top_k: int = 8
    mask_ratio: float = 0.6
    mask_block: tuple[int, int] = (1, 1)
    target_norm: str = "instance"
    loss_beta: float = 0.0
    tau_start: float = 0.999
    tau_end: float = 0.9999
    tau_steps: int = 30_000

    def __post_init__(self) -> None:
        for name in ("input_size", "mask_block"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        name = "Data2VecConfig"
        if self.modality not in MODALITIES:
            raise ValueError(f"{name}: modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.target_norm not in TARGET_NORMS:
            raise ValueError(
                f"{name}: target_norm must be one of {TARGET_NORMS}, got {self.target_norm!r}"
            )
        if not 1 <= self.top_k <= self.layers:
            raise ValueError(f"{name}: top_k={self.top_k} must be in [1, layers={self.layers}]")
        if not 0.0 <= self.tau_start <= self.tau_end <= 1.0 or self.tau_steps < 0:
            raise ValueError(
                f"{name}: need 0 <= tau_start ({self.tau_start}) <= tau_end ({self.tau_end}) "
                f"<= 1 and tau_steps >= 0 ({self.tau_steps})"
            )
        if self.loss_beta < 0:
            raise ValueError(f"{name}: loss_beta must be >= 0, got {self.loss_beta}")
        if self.modality == "text":
            if not 0.0 < self.mask_ratio <= 1.0 or not 0 <= self.mask_id < self.vocab_size:
                raise ValueError(
                    f"{name}: text needs mask_ratio in (0, 1] (got {self.mask_ratio}) and "
                    f"mask_id in [0, vocab_size={self.vocab_size}) (got {self.mask_id})"
                )
        else:
            h, w = self.input_size
            if self.patch_size < 1 or h % self.patch_size or w % self.patch_size:
                raise ValueError(
                    f"{name}: input_size={self.input_size} must be positive multiples of "
                    f"patch_size={self.patch_size}"
                )
            if self.modality == "image" and h != w:
                raise ValueError(
                    f"{name}: images are square (the ViT tower), got {self.input_size}"
                )
            if not 0.0 < self.mask_ratio < 1.0 or self.masked < 1 or self.masked == self.patches:
                raise ValueError(
                    f"{name}: mask_ratio={self.mask_ratio} must mask some but not all of "
                    f"{self.patches} patches"
                )
            if not all(1 <= b <= g for b, g in zip(self.mask_block, self.grid)):
                raise ValueError(
                    f"{name}: mask_block={self.mask_block} must lie within the patch grid {self.grid}"
                )
        _ = self.tower  # building it checks widths by heads and the activation

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along height and width (audio: along frames and mels)."""
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def masked(self) -> int:
        """Masked patches per example (images, audio): MAE's rounding of the kept share."""
        return self.patches - int(self.patches * (1 - self.mask_ratio))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image or spectrogram: ``(C, H, W)``; audio ``(1, frames, mels)``."""
        return (self.in_channels, *self.input_size)

    @property
    def transformer(self) -> TransformerConfig:
        return TransformerConfig(
            width=self.width, layers=self.layers, heads=self.heads, mlp_dim=self.mlp_dim,
            act=self.act, norm_eps=self.norm_eps, dropout=self.dropout,
            norm_first=self.norm_first,
        )  # fmt: skip

    @property
    def tower(self) -> ViTConfig | TextConfig:
        """The shared tower the student and the teacher run: a ViT for images, a text tower
        for text; audio runs the ViT's stack behind its own (frames, mels) embeddings,
        described by a ViT config of its patch size (``fmm.nn.towers.encode_embeddings``)."""
        if self.modality == "text":
            return TextConfig(
                vocab_size=self.vocab_size, context_length=self.context_length,
                transformer=self.transformer, norm_embed=not self.norm_first,
                norm=self.norm_first, dropout=self.dropout,
            )  # fmt: skip
        size = self.input_size[0] if self.modality == "image" else self.patch_size
        return ViTConfig(
            image_size=size, patch_size=self.patch_size, transformer=self.transformer,
            in_channels=self.in_channels, norm=self.norm_first, mask_token=True,
            embed_std=0.02, dropout=self.dropout,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's base settings (Section 4) per modality; the tiny presets scale top_k with depth.
def data2vec_image_base() -> Data2VecConfig:
    """ViT-B/16 on 224² images: top 6 layers, 60% of patches masked in blocks, smooth L1
    (beta 2), decay 0.9998 -> 0.9999."""
    return Data2VecConfig(
        top_k=6, mask_ratio=0.6, mask_block=(4, 4), loss_beta=2.0, tau_start=0.9998,
        tau_end=0.9999, tau_steps=100_000,
    )  # fmt: skip


def data2vec_text_base(*, vocab_size: int = 50_265, mask_id: int = 50_264) -> Data2VecConfig:
    """RoBERTa-base sizes (post-norm, 512 positions): top 8 layers layer-normalised, 15% of
    tokens masked, smooth L1 (beta 4), decay 0.999 -> 0.9999 over 100k updates."""
    return Data2VecConfig(
        modality="text", vocab_size=vocab_size, mask_id=mask_id, norm_first=False,
        norm_eps=1e-5, top_k=8, mask_ratio=0.15, target_norm="layer", loss_beta=4.0,
        tau_start=0.999, tau_end=0.9999, tau_steps=100_000,
    )  # fmt: skip


def data2vec_audio_base() -> Data2VecConfig:
    """A base (768-wide, 12-layer) encoder over AudioMAE's ``[B, 1, 1024, 128]`` log-mel
    spectrograms in 16² patches (a 64 x 8 grid): top 8 layers, time spans of 2 patches
    across every mel band masked to about half (the paper's speech share), squared error,
    decay 0.999 -> 0.9999 over 30k updates."""
    return Data2VecConfig(
        modality="audio", input_size=(1024, 128), in_channels=1, top_k=8, mask_ratio=0.5,
        mask_block=(2, 8), tau_start=0.999, tau_end=0.9999, tau_steps=30_000,
    )  # fmt: skip


_TINY = dict(width=64, layers=4, heads=4, mlp_dim=128, top_k=2, tau_start=0.99, tau_end=0.999,
             tau_steps=100)  # fmt: skip


def data2vec_image_tiny(*, image_size: int = 32) -> Data2VecConfig:
    """32² images in 4² patches (an 8 x 8 grid), a 4-layer width-64 encoder, top 2 layers,
    60% masked in 2 x 2 blocks, decay 0.99 -> 0.999 over 100 updates."""
    return Data2VecConfig(
        input_size=(image_size, image_size), patch_size=4, mask_block=(2, 2), loss_beta=2.0,
        **_TINY,
    )  # fmt: skip


def data2vec_text_tiny(*, vocab_size: int = 64, context_length: int = 32) -> Data2VecConfig:
    """A 4-layer width-64 post-norm text encoder over 64 ids (the last one is [MASK]),
    top 2 layers layer-normalised, 15% of tokens masked."""
    return Data2VecConfig(
        modality="text", vocab_size=vocab_size, context_length=context_length,
        mask_id=vocab_size - 1, norm_first=False, norm_eps=1e-5, mask_ratio=0.15,
        target_norm="layer", loss_beta=4.0, **_TINY,
    )  # fmt: skip


def data2vec_audio_tiny(*, frames: int = 64, mels: int = 32) -> Data2VecConfig:
    """``[B, 1, 64, 32]`` spectrograms (MAE's tiny audio input) in 8² patches (an 8 x 4
    grid), a 4-layer width-64 encoder, top 2 layers, half the patches masked in time spans
    of 2 patches across every mel band."""
    return Data2VecConfig(
        modality="audio", input_size=(frames, mels), in_channels=1, patch_size=8,
        mask_ratio=0.5, mask_block=(2, 4), **_TINY,
    )  # fmt: skip
