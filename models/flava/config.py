"""FLAVA's static configuration and its presets (the builders)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fmm.nn import TransformerConfig
from models.bert.config import BertConfig


@dataclass(frozen=True, kw_only=True)
class FLAVAConfig:
    """Every static choice of FLAVA: a ViT image encoder, a BERT-embedding text encoder
    (both pre-norm, each with a final LayerNorm and a tanh pooler), a multimodal encoder
    over ``[cls, image tokens, text tokens]``, and the pretraining heads.

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

    def __post_init__(self) -> None:
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
        self.image_transformer, self.text_transformer, self.mm_transformer  # noqa: B018
        self.text_embeddings  # noqa: B018

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
    def text_embeddings(self) -> BertConfig:
        """The BERT config whose embeddings (word + position + token type + LayerNorm) the
        text encoder shares; its own blocks are pre-norm (see :attr:`text_transformer`)."""
        return BertConfig(
            vocab_size=self.vocab_size, width=self.text_width, layers=self.text_layers,
            heads=self.text_heads, mlp_dim=self.text_mlp_dim, max_positions=self.max_positions,
            type_vocab_size=self.type_vocab_size, act=self.act, norm_eps=self.norm_eps,
            dropout=self.dropout, attn_dropout=0.0, pad_id=self.pad_id, pooler=True,
            attn_impl=self.attn_impl,
        )  # fmt: skip

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (for ``config.json``)."""
        return asdict(self)


def flava_model() -> FLAVAConfig:
    """FLAVA full (TorchMultimodal's ``flava_model``): 768 wide, 12 image and 12 text layers,
    6 multimodal layers, 12 heads, MLP 3072, 224 px images in 16 px patches, BERT's 30522
    word vocabulary, 8192 image codes (DALL-E's), 768-d contrastive embeddings."""
    return FLAVAConfig()


def flava_tiny(
    *, vocab_size: int = 64, max_positions: int = 16, image_vocab_size: int = 64
) -> FLAVAConfig:
    """A FLAVA for the shapes world on a laptop CPU: 32 px images in 8 px patches (4 x 4,
    the grid of ``models.vqvae.vqvae_shapes_4x4``), width 64, 2 layers per encoder, 4 heads,
    MLP 128, 64-d embeddings."""
    return FLAVAConfig(
        image_size=32, patch_size=8, image_width=64, image_layers=2, image_heads=4,
        image_mlp_dim=128, vocab_size=vocab_size, max_positions=max_positions,
        text_width=64, text_layers=2, text_heads=4, text_mlp_dim=128, mm_width=64,
        mm_layers=2, mm_heads=4, mm_mlp_dim=128, embed_dim=64,
        image_vocab_size=image_vocab_size,
    )  # fmt: skip
