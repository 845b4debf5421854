"""ALBEF's static configuration and its presets (the builders)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from fmm.fusion import CrossAttentionFusionConfig
from fmm.nn import TransformerConfig
from fmm.nn.towers import ViTConfig
from models.bert.config import BertConfig

_INIT_STD = 0.02  # ALBEF's initializer_range (embeddings, heads)


@dataclass(frozen=True, kw_only=True)
class ALBEFConfig:
    """Every static choice of an ALBEF model (Li et al. 2021, "Align before Fuse").

    Three encoders: a pre-norm ViT over image patches (torchvision's layout, LayerNorm eps
    1e-6, exact GELU), a post-norm BERT text encoder (``text``, without pooler), and a
    post-norm multimodal encoder of ``fusion_layers`` blocks in which text tokens also
    cross-attend to the image tokens (width, heads, MLP and eps of ``text``). Projections to
    ``embed_dim`` feed the contrastive loss; heads: ITM (2-way), MLM (tied to the word
    embeddings) and, when ``num_answers > 0``, a VQA answer classifier.

    Training constants: ``momentum`` of the momentum encoders, ``queue_size`` momentum
    features per modality kept for contrast, ``alpha`` the weight of momentum distillation,
    ramped linearly from 0 over the first ``alpha_ramp_steps`` steps (0: no ramp; ALBEF
    ramps over its first epoch), ``temp`` the initial contrastive temperature (learned,
    projected into [0.001, 0.5]). MLM hides tokens behind ``text.mask_id``.

    The dataclass is the component builder; :func:`albef_base` and :func:`albef_tiny` are
    presets. Hashable, so ``torch.compile`` guards on it cheaply.
    """

    # image encoder (ViT)
    image_size: int
    patch_size: int
    image_width: int
    image_layers: int
    image_heads: int
    image_mlp_dim: int
    in_channels: int = 3
    image_norm_eps: float = 1e-6
    # text encoder and multimodal encoder
    text: BertConfig
    fusion_layers: int
    # contrastive and heads
    embed_dim: int = 256
    num_answers: int = 0
    # training constants
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    alpha_ramp_steps: int = 0
    temp: float = 0.07

    def __post_init__(self) -> None:
        if self.text.pooler:
            raise ValueError("ALBEFConfig: text must be a BertConfig with pooler=False")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ALBEFConfig: image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )
        for name in ("image_size", "patch_size", "image_mlp_dim", "embed_dim", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ALBEFConfig: {name} must be positive, got {getattr(self, name)}")
        if self.num_answers < 0 or self.alpha_ramp_steps < 0:
            raise ValueError(
                f"ALBEFConfig: num_answers={self.num_answers} and alpha_ramp_steps="
                f"{self.alpha_ramp_steps} must be >= 0"
            )
        if not 0.0 <= self.momentum <= 1.0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"ALBEFConfig: momentum and alpha must lie in [0, 1], "
                f"got momentum={self.momentum}, alpha={self.alpha}"
            )
        if not 0.001 <= self.temp <= 0.5:
            raise ValueError(f"ALBEFConfig: temp must lie in [0.001, 0.5], got {self.temp}")
        self.image_transformer, self.fusion  # noqa: B018  (validates widths and heads now)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def image_tower(self) -> ViTConfig:
        """The image encoder: the shared ViT tower (patch bias, final norm, no dropout)."""
        return ViTConfig(
            image_size=self.image_size, patch_size=self.patch_size, in_channels=self.in_channels,
            transformer=self.image_transformer, patch_bias=True, norm=True,
            embed_std=_INIT_STD,
        )  # fmt: skip

    @property
    def image_transformer(self) -> TransformerConfig:
        return TransformerConfig(
            width=self.image_width, layers=self.image_layers, heads=self.image_heads,
            mlp_dim=self.image_mlp_dim, norm_eps=self.image_norm_eps,
            attn_impl=self.text.attn_impl,
        )  # fmt: skip

    @property
    def fusion(self) -> CrossAttentionFusionConfig:
        t = self.text
        return CrossAttentionFusionConfig(
            transformer=TransformerConfig(
                width=t.width, layers=self.fusion_layers, heads=t.heads, mlp_dim=t.mlp_dim,
                act=t.act, norm_eps=t.norm_eps, dropout=t.dropout, attn_dropout=t.attn_dropout,
                cross_dim=self.image_width, attn_impl=t.attn_impl, norm_first=False,
            )
        )  # fmt: skip

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (for ``config.json``); inverse of :meth:`from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ALBEFConfig:
        """The config that :meth:`to_dict` wrote. Example: ``ALBEFConfig.from_dict(c.to_dict())``."""
        if "text" not in d:
            raise ValueError(f"ALBEFConfig.from_dict: no 'text' entry; got keys {sorted(d)}")
        return cls(**{**d, "text": BertConfig.from_dict(d["text"])})


def albef_base(*, num_answers: int = 0) -> ALBEFConfig:
    """ALBEF as published (ViT-B/16 at 256 px, 6-layer BERT-base text encoder, 6-layer
    multimodal encoder; width 768, 12 heads, MLP 3072, embeddings 256, queue 65536)."""
    text = BertConfig(
        vocab_size=30522, width=768, layers=6, heads=12, mlp_dim=3072, dropout=0.0,
        attn_dropout=0.0, pooler=False,
    )  # fmt: skip
    return ALBEFConfig(
        image_size=256,
        patch_size=16,
        image_width=768,
        image_layers=12,
        image_heads=12,
        image_mlp_dim=3072,
        text=text,
        fusion_layers=6,
        num_answers=num_answers,
    )


def albef_tiny(
    *,
    vocab_size: int = 64,
    max_positions: int = 24,
    num_answers: int = 0,
    queue_size: int = 256,
    mask_id: int = 1,
    alpha_ramp_steps: int = 0,
) -> ALBEFConfig:
    """An ALBEF for the built-in shapes world on a laptop CPU: 32 px images in 4 px patches,
    width 64 everywhere, 2 image, 2 text and 2 multimodal layers, 4 heads, no dropout.
    Runs of a few hundred steps want a momentum model that keeps up: momentum 0.98 (an
    average over ~50 steps) where ALBEF's long runs use 0.995. MLM's [MASK] is ``mask_id``
    (default 1: ``<unk>`` of ``train.data``'s word tokenizer, which the world never uses)."""
    text = BertConfig(
        vocab_size=vocab_size, width=64, layers=2, heads=4, mlp_dim=128,
        max_positions=max_positions, dropout=0.0, attn_dropout=0.0, pooler=False,
        mask_id=mask_id, special_ids=(),
    )  # fmt: skip
    return ALBEFConfig(
        image_size=32,
        patch_size=4,
        image_width=64,
        image_layers=2,
        image_heads=4,
        image_mlp_dim=128,
        text=text,
        fusion_layers=2,
        embed_dim=32,
        num_answers=num_answers,
        queue_size=queue_size,
        momentum=0.98,
        alpha_ramp_steps=alpha_ramp_steps,
    )


def with_answers(cfg: ALBEFConfig, num_answers: int) -> ALBEFConfig:
    """``cfg`` with a VQA head of ``num_answers`` classes."""
    return replace(cfg, num_answers=num_answers)
