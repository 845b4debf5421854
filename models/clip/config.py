"""CLIP's static configuration and its presets (the builders)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from fmm.nn import TransformerConfig
from fmm.nn.towers import TextConfig, ViTConfig


@dataclass(frozen=True, kw_only=True)
class CLIPConfig:
    """Every static choice of a CLIP model: a ViT image tower and a causal text tower.

    The dataclass is CLIP's component builder: pass any sizes. Presets below fix the
    published ones. Hashable, so ``torch.compile`` guards on it cheaply.

    Each tower has its own width, depth, heads and MLP width: ``image_mlp_dim`` /
    ``text_mlp_dim`` (None: ``int(width * mlp_ratio)``, the published CLIPs' 4x) state a
    tower's MLP hidden width as checkpoints do, so towers whose ratios differ load too.

    ``frames`` makes the image tower a video tower (:class:`fmm.nn.towers.ViTConfig`'s):
    it takes clips ``[B, C, frames, H, W]`` cut in tubes of ``tubelet`` frames, and the
    rest of CLIP (text tower, projections, loss) is unchanged. ``None``: images.

    ``image_size``: a square side, or ``(height, width)``; with ``in_channels=1`` and
    ``(frames, mels)`` the image tower is an audio tower over log-mel spectrograms ``[B, 1,
    frames, mels]`` (CLAP-style, :func:`clap_tiny`), the rest of CLIP again unchanged.
    """

    embed_dim: int
    # image tower (ViT)
    image_size: int | tuple[int, int]
    patch_size: int
    image_width: int
    image_layers: int
    image_heads: int
    image_mlp_dim: int | None = None
    in_channels: int = 3
    frames: int | None = None
    tubelet: int = 1
    # text tower
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp_dim: int | None = None
    # shared
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    init_logit_scale: float = math.log(1 / 0.07)
    attn_impl: str = "sdpa"  # "math" vmaps without a per-example loop (per-example grads)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, list):  # a config.json round trip gives a list
            object.__setattr__(self, "image_size", tuple(self.image_size))
        sides = (self.image_size,) if isinstance(self.image_size, int) else self.image_size
        if self.patch_size < 1 or any(n < 1 or n % self.patch_size for n in sides):
            raise ValueError(
                f"CLIPConfig: image_size={self.image_size} is not a positive multiple of "
                f"patch_size={self.patch_size} (each side, for a (height, width) pair)"
            )
        for name in ("embed_dim", "context_length", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CLIPConfig: {name} must be positive, got {getattr(self, name)}")
        # Building the tower configs validates widths, heads, MLP widths and the activation now.
        self.image_tower, self.text_tower  # noqa: B018

    @property
    def grid(self) -> int:
        """Patches per side of a square image tower."""
        return self.image_tower.grid

    def _tower(self, width: int, layers: int, heads: int, mlp_dim: int | None) -> TransformerConfig:
        return TransformerConfig(
            width=width, layers=layers, heads=heads, mlp_ratio=self.mlp_ratio, mlp_dim=mlp_dim,
            act=self.act, norm_eps=self.norm_eps, attn_impl=self.attn_impl,
        )  # fmt: skip

    @property
    def image_transformer(self) -> TransformerConfig:
        return self._tower(
            self.image_width, self.image_layers, self.image_heads, self.image_mlp_dim
        )

    @property
    def text_transformer(self) -> TransformerConfig:
        return self._tower(self.text_width, self.text_layers, self.text_heads, self.text_mlp_dim)

    @property
    def image_tower(self) -> ViTConfig:
        """The shared ViT tower as CLIP configures it: a patch conv without bias, a layer
        norm before the stack (OpenAI's ``ln_pre``) and a final one."""
        return ViTConfig(
            image_size=self.image_size, patch_size=self.patch_size,
            transformer=self.image_transformer, in_channels=self.in_channels, patch_bias=False,
            norm_pre=True, frames=self.frames, tubelet=self.tubelet,
        )  # fmt: skip

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input of the image tower: ``(C, H, W)``, or ``(C, frames, H, W)`` for video
        (an audio tower: ``(1, frames, mels)``)."""
        time = () if self.frames is None else (self.frames,)
        return (self.in_channels, *time, *self.image_tower.size)

    @property
    def text_tower(self) -> TextConfig:
        """The shared text tower as CLIP configures it: causal, with a final layer norm."""
        return TextConfig(
            vocab_size=self.vocab_size, context_length=self.context_length,
            transformer=self.text_transformer, causal=True,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (for ``config.json``); ``CLIPConfig(**d)`` reads them back."""
        return asdict(self)


_OPENAI_TEXT = dict(
    context_length=77, vocab_size=49408, text_width=512, text_layers=12, text_heads=8
)


def clip_vit_b16() -> CLIPConfig:
    """OpenAI CLIP ViT-B/16: 224 px, patch 16, width 768 x 12 layers, text 512 x 12, embed 512."""
    return CLIPConfig(
        embed_dim=512,
        image_size=224,
        patch_size=16,
        image_width=768,
        image_layers=12,
        image_heads=12,
        **_OPENAI_TEXT,
    )


def clip_vit_b32() -> CLIPConfig:
    """OpenAI CLIP ViT-B/32: as B/16 with 32-pixel patches."""
    return CLIPConfig(
        embed_dim=512,
        image_size=224,
        patch_size=32,
        image_width=768,
        image_layers=12,
        image_heads=12,
        **_OPENAI_TEXT,
    )


def clip_vit_l14() -> CLIPConfig:
    """OpenAI CLIP ViT-L/14: 224 px, patch 14, width 1024 x 24, text 768 x 12 (12 heads), embed 768."""
    return CLIPConfig(
        embed_dim=768,
        image_size=224,
        patch_size=14,
        image_width=1024,
        image_layers=24,
        image_heads=16,
        context_length=77,
        vocab_size=49408,
        text_width=768,
        text_layers=12,
        text_heads=12,
    )


def clip_video_tiny(*, vocab_size: int = 64, context_length: int = 10) -> CLIPConfig:
    """:func:`clip_tiny` with a video tower for the moving-shapes clips: 8 frames of 32 px in
    tubes of 2 frames x 8 x 8 pixels, so 64 space-time tokens (as many as clip_tiny's patches)."""
    return dataclasses.replace(
        clip_tiny(vocab_size=vocab_size, context_length=context_length),
        frames=8, tubelet=2, patch_size=8,
    )  # fmt: skip


def clip_tiny(*, vocab_size: int = 64, context_length: int = 16) -> CLIPConfig:
    """A CLIP sized for the built-in shapes world on a laptop CPU (32 px images, ~1.2M params)."""
    return CLIPConfig(
        embed_dim=64,
        image_size=32,
        patch_size=4,
        image_width=128,
        image_layers=3,
        image_heads=4,
        context_length=context_length,
        vocab_size=vocab_size,
        text_width=128,
        text_layers=3,
        text_heads=4,
        act="gelu",
    )


def clap_tiny(
    *, vocab_size: int = 64, context_length: int = 20, frames: int = 64, mels: int = 32
) -> CLIPConfig:
    """:func:`clip_tiny` with an audio tower, CLAP-style: log-mel spectrograms ``[B, 1,
    frames, mels]`` (the sound world's one-second clips at ``train.recipes.mae.SOUND_MEL``:
    64 frames x 32 mels) cut in 8 x 8 patches, an 8 x 4 grid of 32 tokens, through 4 blocks
    (one more than clip_tiny's: its 32 tokens cost half of clip_tiny's 65 per block, and it
    keeps clip_tiny the family's smallest preset, the one the contract suite runs). The text
    tower holds the sound world's longest captions (18 words, with ``<sot>`` and ``<eot>``).

    Example: ``clip.encode_image(params, torch.randn(2, 1, 64, 32), cfg=clap_tiny())``.
    """
    return dataclasses.replace(
        clip_tiny(vocab_size=vocab_size, context_length=context_length),
        image_size=(frames, mels), patch_size=8, in_channels=1, image_layers=4,
    )  # fmt: skip


def clap_vit_b16() -> CLIPConfig:
    """An audio-text CLIP at a published size: a ViT-B/16 audio tower (width 768 x 12
    layers, AudioMAE's and AST's encoder) over AudioMAE's 1024-frame x 128-mel fbank
    (``fmm.audio.AUDIOMAE``: 64 x 8 patches, 513 tokens with the class token) and OpenAI
    CLIP's text tower (512 x 12, 77 tokens), embed 512.

    No parity target exists: LAION-CLAP's audio tower is HTS-AT (a Swin transformer over
    the spectrogram) or PANN (a CNN), not a ViT, and Microsoft's CLAP uses a CNN too; this
    is the shape of "CLIP with an AudioMAE-sized audio ViT", trained from scratch here.
    """
    return CLIPConfig(
        embed_dim=512, image_size=(1024, 128), patch_size=16, image_width=768,
        image_layers=12, image_heads=12, in_channels=1, **_OPENAI_TEXT,
    )  # fmt: skip
