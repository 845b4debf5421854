"""FLAVA's static configuration, its pretraining objective's choices and its presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fmm.nn import TransformerConfig
from fmm.nn.towers import TextConfig, ViTConfig

TASKS = ("contrastive", "mlm", "mim", "itm", "mmm_text", "mmm_image")
_INIT_STD = 0.02  # FLAVA's initializer_range


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Static choices of the pretraining objective: masking rates, the text [MASK] id, the
    ids never masked (padding is never masked either), and one weight per task (0 drops its
    term; a task left out weighs 0). The defaults are BERT's WordPiece ids ([MASK] 103,
    [CLS] 101, [SEP] 102), as FLAVA's text side uses them. Hashable (tuples only)."""

    mask_id: int = 103
    special_ids: tuple[int, ...] = (101, 102)
    text_mask_rate: float = 0.15
    patch_mask_rate: float = 0.4
    itm_negative_rate: float = 0.5
    weights: tuple[tuple[str, float], ...] = tuple((t, 1.0) for t in TASKS)

    def __post_init__(self) -> None:
        # JSON gives lists back: store tuples, so the config stays hashable.
        object.__setattr__(self, "special_ids", tuple(self.special_ids))
        object.__setattr__(self, "weights", tuple((t, float(w)) for t, w in self.weights))
        for name in ("text_mask_rate", "patch_mask_rate", "itm_negative_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"PretrainConfig: {name} must be in [0, 1], got {getattr(self, name)}"
                )
        if self.mask_id < 0 or any(i < 0 for i in self.special_ids):
            raise ValueError(
                f"PretrainConfig: mask_id={self.mask_id} and special_ids={self.special_ids} "
                "must be token ids >= 0"
            )
        unknown = sorted({t for t, _ in self.weights} - set(TASKS))
        if unknown:
            raise ValueError(f"PretrainConfig: unknown tasks {unknown} in weights; tasks: {TASKS}")

    def weight(self, task: str) -> float:
        return dict(self.weights).get(task, 0.0)


@dataclass(frozen=True, kw_only=True)
class FLAVAConfig:
    """Every static choice of FLAVA: a ViT image encoder and a text encoder with BERT's
    embeddings (both the shared towers of :mod:`fmm.nn.towers`, pre-norm, each with a final
    LayerNorm and a tanh pooler), a multimodal encoder over ``[cls, image tokens, text
    tokens]``, the pretraining heads, and ``pretrain`` (:class:`PretrainConfig`), the
    objective's static choices.

    The dataclass is FLAVA's component builder (any sizes); :func:`flava_model` fixes the
    published ones. ``norm_eps`` (1e-12) is the encoders', ``head_norm_eps`` (1e-5) the
    masked-prediction heads'. ``embed_dim``: the contrastive embedding width;
    ``image_vocab_size``: the number of MIM target codes (the image tokenizer's codebook).
    ``image_masking``: whether the image encoder has a learned [MASK] patch token.
    Hashable, so ``torch.compile`` guards on it cheaply.
    """

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    image_width: int = 768
    image_layers: int = 12
    image_heads: int = 12
    image_mlp_dim: int = 3072
    image_masking: bool = True

    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    pad_id: int = 0
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_mlp_dim: int = 3072

    mm_width: int = 768
    mm_layers: int = 6
    mm_heads: int = 12
    mm_mlp_dim: int = 3072

    embed_dim: int = 768
    image_vocab_size: int = 8192
    act: str = "gelu"
    norm_eps: float = 1e-12
    head_norm_eps: float = 1e-5
    dropout: float = 0.0
    logit_scale_init: float = math.log(1 / 0.07)
    attn_impl: str = "sdpa"
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.pretrain, dict):  # from JSON (to_dict's output)
            object.__setattr__(self, "pretrain", PretrainConfig(**self.pretrain))
        if not isinstance(self.pretrain, PretrainConfig):
            raise TypeError(
                f"FLAVAConfig: pretrain must be a PretrainConfig, got {type(self.pretrain).__name__}"
            )
        for name in (
            "image_size", "patch_size", "in_channels", "vocab_size", "max_positions",
            "type_vocab_size", "embed_dim", "image_vocab_size",
            "image_mlp_dim", "text_mlp_dim", "mm_mlp_dim",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"FLAVAConfig: {name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"FLAVAConfig: image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"FLAVAConfig: pad_id={self.pad_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        # Validate widths, heads and the activation now, not at the first forward.
        self.image_tower, self.text_tower, self.mm_transformer  # noqa: B018

    def _stack(self, width: int, layers: int, heads: int, mlp_dim: int) -> TransformerConfig:
        return TransformerConfig(
            width=width, layers=layers, heads=heads, mlp_dim=mlp_dim, act=self.act,
            norm_eps=self.norm_eps, dropout=self.dropout, attn_impl=self.attn_impl,
            norm_first=True,
        )  # fmt: skip

    @property
    def image_transformer(self) -> TransformerConfig:
        return self._stack(
            self.image_width, self.image_layers, self.image_heads, self.image_mlp_dim
        )

    @property
    def text_transformer(self) -> TransformerConfig:
        return self._stack(self.text_width, self.text_layers, self.text_heads, self.text_mlp_dim)

    @property
    def mm_transformer(self) -> TransformerConfig:
        return self._stack(self.mm_width, self.mm_layers, self.mm_heads, self.mm_mlp_dim)

    @property
    def image_tower(self) -> ViTConfig:
        """The image encoder: a ViT with a patch bias, a learned [MASK] patch (if
        ``image_masking``), a final norm and embedding dropout."""
        return ViTConfig(
            image_size=self.image_size, patch_size=self.patch_size, in_channels=self.in_channels,
            transformer=self.image_transformer, patch_bias=True, norm=True,
            mask_token=self.image_masking, embed_std=_INIT_STD, dropout=self.dropout,
        )  # fmt: skip

    @property
    def text_tower(self) -> TextConfig:
        """The text encoder: BERT's embeddings (word, position, token type, LayerNorm) under
        pre-norm blocks and a final norm."""
        return TextConfig(
            vocab_size=self.vocab_size, context_length=self.max_positions,
            transformer=self.text_transformer, type_vocab_size=self.type_vocab_size,
            norm_embed=True, norm=True, token_std=_INIT_STD, pos_std=_INIT_STD,
            dropout=self.dropout,
        )  # fmt: skip

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (for ``config.json``); inverse of :meth:`from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FLAVAConfig:
        """The config :meth:`to_dict` wrote (a dict without ``pretrain`` gets the default
        objective). Example: ``FLAVAConfig.from_dict(json.loads(text))``."""
        return cls(**d)


def flava_model() -> FLAVAConfig:
    """FLAVA full (TorchMultimodal's ``flava_model``): 768 wide, 12 image and 12 text layers,
    6 multimodal layers, 12 heads, MLP 3072, 224 px images in 16 px patches, BERT's 30522
    word vocabulary, 8192 image codes (DALL-E's), 768-d contrastive embeddings."""
    return FLAVAConfig()


def flava_tiny(
    *,
    vocab_size: int = 64,
    max_positions: int = 16,
    image_vocab_size: int = 64,
    pretrain: PretrainConfig | None = None,
) -> FLAVAConfig:
    """A FLAVA for the shapes world on a laptop CPU: 32 px images in 8 px patches (4 x 4,
    the grid of ``models.vqvae.vqvae_shapes_4x4``), width 64, 2 layers per encoder, 4 heads,
    MLP 128, 64-d embeddings. ``pretrain`` default: the last id is [MASK] and ids 1, 2
    (``<unk>``, ``<sot>`` of ``train.data``'s word tokenizer) are never masked."""
    if pretrain is None:
        pretrain = PretrainConfig(mask_id=vocab_size - 1, special_ids=(1, 2))
    return FLAVAConfig(
        image_size=32, patch_size=8, image_width=64, image_layers=2, image_heads=4,
        image_mlp_dim=128, vocab_size=vocab_size, max_positions=max_positions,
        text_width=64, text_layers=2, text_heads=4, text_mlp_dim=128, mm_width=64,
        mm_layers=2, mm_heads=4, mm_mlp_dim=128, embed_dim=64,
        image_vocab_size=image_vocab_size, pretrain=pretrain,
    )  # fmt: skip


def _flava_native(width: int, mlp: int, layers: int, mm_layers: int) -> FLAVAConfig:
    return FLAVAConfig(
        image_width=width, image_layers=layers, image_heads=16, image_mlp_dim=mlp,
        text_width=width, text_layers=layers, text_heads=16, text_mlp_dim=mlp,
        mm_width=width, mm_layers=mm_layers, mm_heads=16, mm_mlp_dim=mlp,
    )  # fmt: skip


def flava_1_8b() -> FLAVAConfig:
    """FLAVA at 1.8B params, TorchMultimodal's native-training config
    (``examples/flava/native/configs/1.8b.yaml``): width 1280, MLP 5120, 16 heads, 32 image
    and 32 text layers, 16 multimodal layers, 224 px images, BERT's vocabulary."""
    return _flava_native(1280, 5120, 32, 16)


def flava_10b() -> FLAVAConfig:
    """FLAVA at 10B params (``examples/flava/native/configs/10b.yaml``): width 2048, MLP
    10240, 16 heads, 64 image and 64 text layers, 40 multimodal layers."""
    return _flava_native(2048, 10240, 64, 40)
