"""BLIP-2's static configuration and its presets (the builders)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fmm.nn import TransformerConfig
from fmm.nn.towers import ViTConfig
from models.gpt.config import GPTConfig, gpt2_small, gpt_tiny

_INIT_STD = 0.02  # BERT's initializer_range: embeddings, queries, heads


@dataclass(frozen=True, kw_only=True)
class Blip2Config:
    """Every static choice of a BLIP-2 model (Li et al. 2023): a frozen ViT image encoder,
    the Q-Former (a post-norm BERT-like stack whose ``queries`` learned query tokens share
    self-attention with the text and cross-attend to the image tokens in every
    ``cross_attention_freq``-th layer, from layer 0), and in stage two a frozen decoder LM
    (``lm``, fmm's GPT) reading the queries projected into its width as a prefix.

    Q-Former: ``width``, ``layers``, ``heads``, ``mlp_dim``, exact GELU, LayerNorm eps
    ``norm_eps`` (BERT's 1e-12), word + learned position embeddings (``max_positions``)
    normalised together with the queries. ``bos_id`` replaces the first text token for
    image-grounded generation (BLIP-2's ``[DEC]``), ``pad_id`` marks padding (never a
    target). Stage one: ITC, ITM and ITG with ``label_smoothing`` on ITC and ITG, the
    contrastive temperature learned from ``temp`` (projected into [0.001, 0.5]) over
    ``embed_dim``-d features. ``stage``: 1 (the three losses) or 2 (the frozen LM's
    captioning loss; needs ``lm``).

    Image encoder: a pre-norm ViT (``image_*``, LayerNorm eps ``image_norm_eps``, a final
    norm) whose tokens pass through a trainable LayerNorm (``ln_vision``, eps
    ``vision_norm_eps``) before the Q-Former reads them. ``image_act``,
    ``image_patch_bias`` and ``image_norm_pre`` (a norm before the stack) make it CLIP's
    image tower (``act``, no patch bias, ``ln_pre``), so a trained CLIP's tower loads as is.
    """

    # Q-Former
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    queries: int = 32
    cross_attention_freq: int = 2
    max_positions: int = 512
    norm_eps: float = 1e-12
    dropout: float = 0.0
    attn_dropout: float = 0.0
    pad_id: int = 0
    bos_id: int = 30522
    embed_dim: int = 256
    temp: float = 0.07
    label_smoothing: float = 0.1
    attn_impl: str = "sdpa"
    # frozen image encoder (ViT)
    image_size: int
    patch_size: int
    image_width: int
    image_layers: int
    image_heads: int
    image_mlp_dim: int
    in_channels: int = 3
    image_norm_eps: float = 1e-6
    vision_norm_eps: float = 1e-5
    image_act: str = "gelu"
    image_patch_bias: bool = True
    image_norm_pre: bool = False
    # stage two
    lm: GPTConfig | None = None
    stage: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.lm, dict):  # from a config.json
            object.__setattr__(self, "lm", GPTConfig(**self.lm))
        for name in ("vocab_size", "queries", "cross_attention_freq", "max_positions",
                     "embed_dim", "image_mlp_dim"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"Blip2Config: {name} must be positive, got {getattr(self, name)}")
        for name in ("pad_id", "bos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"Blip2Config: {name}={getattr(self, name)} is outside the vocabulary "
                    f"[0, {self.vocab_size})"
                )
        if self.stage not in (1, 2) or (self.stage == 2 and self.lm is None):
            raise ValueError(f"Blip2Config: stage must be 1, or 2 with lm=, got {self.stage}")
        if not 0.001 <= self.temp <= 0.5:
            raise ValueError(f"Blip2Config: temp must lie in [0.001, 0.5], got {self.temp}")
        if self.lm is not None and self.queries >= self.lm.context_length:
            raise ValueError(
                f"Blip2Config: {self.queries} queries leave no room for text in the LM's "
                f"context_length={self.lm.context_length}"
            )
        # Build the parts now, so bad widths, heads or sizes fail at construction.
        self.image_tower, self.block(0)

    def has_cross(self, layer: int) -> bool:
        """Whether Q-Former layer ``layer`` cross-attends to the image (every
        ``cross_attention_freq``-th, from layer 0, as BLIP-2 builds it)."""
        return layer % self.cross_attention_freq == 0

    def block(self, layer: int) -> TransformerConfig:
        """The config of Q-Former block ``layer``: post-norm, a query MLP beside the text
        MLP, cross-attention to ``image_width``-d tokens where :meth:`has_cross`."""
        return TransformerConfig(
            width=self.width, layers=self.layers, heads=self.heads, mlp_dim=self.mlp_dim,
            act="gelu", norm_eps=self.norm_eps, dropout=self.dropout,
            attn_dropout=self.attn_dropout, attn_impl=self.attn_impl, norm_first=False,
            cross_dim=self.image_width if self.has_cross(layer) else None, query_mlp=True,
        )  # fmt: skip

    @property
    def blocks(self) -> tuple[TransformerConfig, ...]:
        """Every Q-Former block's config, in order (:func:`fmm.nn.transformer`'s ``cfg=``)."""
        return tuple(self.block(i) for i in range(self.layers))

    @property
    def image_tower(self) -> ViTConfig:
        """The frozen image encoder: the shared ViT tower (patch bias, final norm)."""
        return ViTConfig(
            image_size=self.image_size, patch_size=self.patch_size, in_channels=self.in_channels,
            transformer=TransformerConfig(
                width=self.image_width, layers=self.image_layers, heads=self.image_heads,
                mlp_dim=self.image_mlp_dim, norm_eps=self.image_norm_eps,
                attn_impl=self.attn_impl, act=self.image_act,
            ),
            patch_bias=self.image_patch_bias, norm_pre=self.image_norm_pre, embed_std=_INIT_STD,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (for ``config.json``); inverse of :meth:`from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blip2Config:
        """The config :meth:`to_dict` wrote. Example: ``Blip2Config.from_dict(c.to_dict()) == c``."""
        return cls(**d)


_VIT_G = dict(
    image_size=224, patch_size=14, image_width=1408, image_layers=39, image_heads=16,
    image_mlp_dim=6144,
)  # fmt: skip
_QFORMER_BASE = dict(vocab_size=30523, width=768, layers=12, heads=12, mlp_dim=3072)


def blip2_vit_g() -> Blip2Config:
    """BLIP-2 stage one at the published sizes: a BERT-base Q-Former (768 x 12 layers, 12
    heads, MLP 3072, BERT's vocabulary plus ``[DEC]`` = 30522) with 32 queries and
    cross-attention every 2 layers over a ViT-g/14 at 224 px (1408 x 39 layers, 16 heads,
    MLP 6144: EVA-CLIP's sizes in our ViT's blocks), features of 256."""
    return Blip2Config(**_QFORMER_BASE, **_VIT_G)


def blip2_vit_g_gpt2() -> Blip2Config:
    """Stage two of :func:`blip2_vit_g` into a frozen GPT-2 small (BLIP-2 uses OPT or
    FlanT5; fmm's decoder LM is GPT)."""
    return Blip2Config(**_QFORMER_BASE, **_VIT_G, lm=gpt2_small(), stage=2)


_TINY = dict(
    vocab_size=64, width=64, layers=2, heads=4, mlp_dim=128, queries=8, max_positions=64,
    bos_id=1, embed_dim=32, image_size=32, patch_size=8, image_width=48, image_layers=2,
    image_heads=4, image_mlp_dim=96,
)  # fmt: skip


def blip2_tiny() -> Blip2Config:
    """A BLIP-2 for tests on a laptop CPU: Q-Former 64 x 2 layers (cross-attention in layer
    0), 8 queries, over a 48-wide 2-layer ViT on 32 px images; ``<unk>`` (1) of
    ``train.data``'s word tokenizer serves as ``[DEC]``."""
    return Blip2Config(**_TINY)


def blip2_gpt_tiny() -> Blip2Config:
    """Stage two of :func:`blip2_tiny` into a frozen :func:`models.gpt.gpt_tiny`."""
    return Blip2Config(**_TINY, lm=gpt_tiny(), stage=2)
