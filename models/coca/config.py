"""CoCa's static configuration and its presets.

Both reference layouts are one dataclass: TorchMultimodal's ``coca_vit`` (the presets) and
open_clip's ``CoCa`` (:func:`open_clip_style`) differ in a few switches, named here:

=================  ==========================================  ==============================
switch             TorchMultimodal (``coca_vit_b_32``)          open_clip (``coca_ViT-B-32``)
=================  ==========================================  ==============================
``image_cls``      False: the pooler reads the patches only    True: a class token too
``image_norm_pre`` False                                       True (``ln_pre``)
``patch_bias``     True                                        False
``pooler``         ``"cascade"``: N captioning queries, then   ``"parallel"``: one pooler of
                   1 contrastive query over their outputs      1 + N queries, the first
                                                               contrastive
``decoder``        ``"fused"``: each layer self-attends,       ``"split"``: a plain block then
                   cross-attends, one MLP                      a cross-only block (its own
                                                               MLP, a norm on the context)
=================  ==========================================  ==============================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from fmm.nn import TransformerConfig
from fmm.nn.pool import AttentionPoolConfig
from fmm.nn.towers import TextConfig, ViTConfig

POOLERS = ("cascade", "parallel")
DECODERS = ("fused", "split")


@dataclass(frozen=True, kw_only=True)
class CoCaConfig:
    """Every static choice of a CoCa model (Yu et al. 2022): a ViT, an attentional pooler
    (one contrastive query and ``caption_queries`` captioning ones), a causal unimodal text
    decoder with a class token appended for the contrastive embedding, and a causal
    multimodal decoder cross-attending the captioning queries, with a vocabulary head.

    ``context_length``: text positions, the appended class token's included (so a caption
    of ``context_length - 1`` tokens is the longest the text decoder reads). ``pad_id``:
    the padding id: the class token does not attend to padding, and the captioning loss
    ignores it. The loss is ``contrastive_weight * contrastive + caption_weight *
    captioning`` (open_clip's and the paper's 1 and 2; TorchMultimodal returns both terms
    unweighted).
    """

    embed_dim: int
    # image tower
    image_size: int
    patch_size: int
    image_width: int
    image_layers: int
    image_heads: int
    image_mlp_dim: int | None = None
    image_cls: bool = False
    image_norm_pre: bool = False
    patch_bias: bool = True
    # attentional pooler
    pool_heads: int
    caption_queries: int = 256
    pooler: str = "cascade"
    # unimodal text decoder
    vocab_size: int
    context_length: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp_dim: int | None = None
    # multimodal decoder (its width is the text decoder's; it cross-attends text_width-wide
    # captioning queries)
    decoder_layers: int
    decoder_heads: int
    decoder_mlp_dim: int | None = None
    decoder: str = "fused"
    # shared
    act: str = "gelu"
    norm_eps: float = 1e-5
    pad_id: int = 0
    init_logit_scale: float = math.log(1 / 0.07)
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        if self.pooler not in POOLERS:
            raise ValueError(f"CoCaConfig: pooler must be one of {POOLERS}, got {self.pooler!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"CoCaConfig: decoder must be one of {DECODERS}, got {self.decoder!r}")
        for name in ("embed_dim", "caption_queries", "vocab_size", "decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"CoCaConfig: {name} must be positive, got {getattr(self, name)}")
        if self.context_length < 2:
            raise ValueError(
                f"CoCaConfig: context_length must be >= 2 (a token and the class token), "
                f"got {self.context_length}"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"CoCaConfig: pad_id must be in [0, {self.vocab_size}), got {self.pad_id}"
            )
        # Building the parts validates widths, heads, MLP widths and the activation now.
        self.image_tower, self.text_tower, self.pool, self.decoder_blocks  # noqa: B018

    def _stack(self, width, layers, heads, mlp_dim, **kw) -> TransformerConfig:
        return TransformerConfig(
            width=width, layers=layers, heads=heads, mlp_dim=mlp_dim, act=self.act,
            norm_eps=self.norm_eps, attn_impl=self.attn_impl, **kw,
        )  # fmt: skip

    @property
    def image_tower(self) -> ViTConfig:
        """The shared ViT without a final norm: the pooler normalises what it reads."""
        return ViTConfig(
            image_size=self.image_size, patch_size=self.patch_size,
            transformer=self._stack(
                self.image_width, self.image_layers, self.image_heads, self.image_mlp_dim
            ),
            patch_bias=self.patch_bias, norm_pre=self.image_norm_pre, norm=False,
            cls_token=self.image_cls,
        )  # fmt: skip

    @property
    def pool(self) -> AttentionPoolConfig:
        """The pooler over the image tokens: ``caption_queries`` queries (``"parallel"``:
        one more, the contrastive one first)."""
        extra = int(self.pooler == "parallel")
        return AttentionPoolConfig(
            dim=self.text_width, heads=self.pool_heads, queries=self.caption_queries + extra,
            context_dim=self.image_width, norm_eps=self.norm_eps, attn_impl=self.attn_impl,
        )  # fmt: skip

    @property
    def contrastive_pool(self) -> AttentionPoolConfig:
        """The cascade's second pooler: one query over the captioning queries."""
        return AttentionPoolConfig(
            dim=self.text_width, heads=self.pool_heads, queries=1, norm_eps=self.norm_eps,
            attn_impl=self.attn_impl,
        )  # fmt: skip

    @property
    def text_tower(self) -> TextConfig:
        """The unimodal decoder: causal; its final norm (``text.norm``) reads only the
        class token, so the tower itself has none."""
        return TextConfig(
            vocab_size=self.vocab_size, context_length=self.context_length,
            transformer=self._stack(
                self.text_width, self.text_layers, self.text_heads, self.text_mlp_dim
            ),
            causal=True, norm=False,
        )  # fmt: skip

    @property
    def decoder_blocks(self) -> tuple[TransformerConfig, ...]:
        """One config per multimodal block: ``"fused"``: ``decoder_layers`` cross-attending
        blocks; ``"split"``: a plain block then a cross-only one, ``decoder_layers`` times."""
        args = (self.text_width, self.decoder_layers, self.decoder_heads, self.decoder_mlp_dim)
        if self.decoder == "fused":
            return (self._stack(*args, cross_dim=self.text_width),) * self.decoder_layers
        plain = self._stack(*args)
        cross = self._stack(*args, cross_dim=self.text_width, cross_only=True, norm_context=True)
        return (plain, cross) * self.decoder_layers

    @property
    def causal_blocks(self) -> tuple[TransformerConfig, ...]:
        """The whole causal stack a caption runs through: unimodal blocks, then multimodal."""
        uni = self.text_tower.transformer
        return (uni,) * uni.layers + self.decoder_blocks

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def to_dict(self) -> dict:
        """Plain JSON-ready fields; ``CoCaConfig(**d)`` reads them back."""
        return asdict(self)


def open_clip_style(cfg: CoCaConfig) -> CoCaConfig:
    """``cfg`` laid out as open_clip's ``CoCa``: a class token and ``ln_pre`` in the ViT, a
    patch conv without bias, one parallel pooler of ``1 + caption_queries`` queries (open_clip's
    ``attn_pooler_queries`` is that sum) and split multimodal layers.

    Example: ``open_clip_style(coca_vit_b32())`` is open_clip's ``coca_ViT-B-32``.
    """
    return dataclasses.replace(
        cfg, image_cls=True, image_norm_pre=True, patch_bias=False, pooler="parallel",
        caption_queries=cfg.caption_queries - 1 if cfg.pooler == "cascade" else cfg.caption_queries,
        decoder="split",
    )  # fmt: skip


def coca_vit_b32(**overrides) -> CoCaConfig:
    """TorchMultimodal's ``coca_vit_b_32``: ViT-B/32 at 224, 512-wide text and multimodal
    decoders of 12 layers, 256 captioning queries, CLIP's 49408-token vocabulary."""
    fields = dict(
        embed_dim=512, image_size=224, patch_size=32, image_width=768, image_layers=12,
        image_heads=12, image_mlp_dim=3072, pool_heads=8, vocab_size=49408,
        context_length=77, text_width=512, text_layers=12, text_heads=8, text_mlp_dim=2048,
        decoder_layers=12, decoder_heads=8, decoder_mlp_dim=2048,
    )  # fmt: skip
    return CoCaConfig(**{**fields, **overrides})


def coca_vit_l14(**overrides) -> CoCaConfig:
    """TorchMultimodal's ``coca_vit_l_14``: ViT-L/14 at 224, 768-wide decoders of 12 layers."""
    fields = dict(
        embed_dim=768, image_size=224, patch_size=14, image_width=1024, image_layers=24,
        image_heads=16, image_mlp_dim=4096, pool_heads=8, vocab_size=49408,
        context_length=77, text_width=768, text_layers=12, text_heads=12, text_mlp_dim=3072,
        decoder_layers=12, decoder_heads=12, decoder_mlp_dim=3072,
    )  # fmt: skip
    return CoCaConfig(**{**fields, **overrides})


def coca_tiny(**overrides) -> CoCaConfig:
    """A few-second CoCa for tests and the shapes world: 32-pixel images in 8-pixel
    patches, 32-wide towers of 2 layers, 8 captioning queries, a 64-token vocabulary."""
    fields = dict(
        embed_dim=32, image_size=32, patch_size=8, image_width=48, image_layers=2,
        image_heads=4, pool_heads=4, caption_queries=8, vocab_size=64, context_length=17,
        text_width=32, text_layers=2, text_heads=4, decoder_layers=2, decoder_heads=4,
    )  # fmt: skip
    return CoCaConfig(**{**fields, **overrides})
