"""MDETR's static configuration and its presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fmm.nn import TransformerConfig
from fmm.nn.resnet import ResNetConfig
from models.bert.config import BertConfig


def roberta_base() -> BertConfig:
    """RoBERTa base as MDETR's text encoder: vocab 50265, width 768 x 12 post-norm layers,
    12 heads, MLP 3072, 514 positions counted from ``pad_id + 1``, one token type, no
    pooler, LayerNorm eps 1e-5."""
    return BertConfig(
        vocab_size=50265, width=768, layers=12, heads=12, mlp_dim=3072, max_positions=514,
        type_vocab_size=1, norm_eps=1e-5, pad_id=1, pooler=False,
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class MDETRConfig:
    """Every static choice of MDETR (Kamath et al. 2021), TorchMultimodal's layout.

    ``backbone``: the ResNet (:mod:`fmm.nn.resnet`); ``text``: the RoBERTa-style encoder
    (a :class:`~models.bert.BertConfig`, positions offset past ``pad_id`` as RoBERTa's).
    ``width``, ``heads``, ``encoder_layers``, ``decoder_layers``, ``mlp_dim``, ``dropout``:
    the post-norm ReLU encoder over ``[image features; text tokens]`` and the decoder over
    ``queries`` learned object queries. ``classes``: the soft-token head's logits less
    the no-object one (token positions a box may name; texts are at most that long).
    ``contrastive_dim``: the contrastive alignment projections (None: no alignment head,
    the plain ``mdetr_resnet101`` layout). ``image_size``: the longest side a batch's
    images may have (images in a batch share one padded size, ``image_mask`` says which
    pixels are real). ``max_boxes``: targets per image in a batch.

    The objective: the Hungarian cost ``cost_class * -p(tokens) + cost_bbox * L1 +
    cost_giou * -GIoU``, the loss ``loss_class * soft-token CE + loss_bbox * L1 +
    loss_giou * (1 - GIoU) + loss_align * contrastive alignment`` (MDETR's 1 / 5 / 2 / 1)
    with unmatched queries' CE weighted ``no_object_weight``. ``aux_loss``: supervise every
    earlier decoder layer's output too, through the same heads, each matched on its own (the
    original MDETR does; TorchMultimodal's ``MDETRLoss`` supervises the last layer only).
    """

    backbone: ResNetConfig = field(default_factory=ResNetConfig)
    text: BertConfig = field(default_factory=roberta_base)
    width: int = 256
    heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6
    mlp_dim: int = 2048
    dropout: float = 0.1
    queries: int = 100
    classes: int = 255
    contrastive_dim: int | None = 64
    image_size: int = 1333
    max_boxes: int = 16
    pos_temperature: float = 10000.0
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    loss_class: float = 1.0
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    loss_align: float = 1.0
    no_object_weight: float = 0.1
    temperature: float = 0.07
    aux_loss: bool = False
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        # config.json gives the nested configs as dicts.
        if isinstance(self.backbone, dict):
            object.__setattr__(self, "backbone", ResNetConfig(**self.backbone))
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", BertConfig(**self.text))
        if self.width % 2:
            raise ValueError(f"MDETRConfig: width must be even (sine positions), got {self.width}")
        for name in ("queries", "classes", "image_size", "max_boxes", "encoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"MDETRConfig: {name} must be positive, got {getattr(self, name)}")
        if self.contrastive_dim is None and self.loss_align:
            raise ValueError("MDETRConfig: loss_align needs contrastive_dim (or set loss_align=0)")
        self.encoder  # noqa: B018  (validates width / heads now)

    @property
    def encoder(self) -> TransformerConfig:
        return TransformerConfig(
            width=self.width, layers=self.encoder_layers, heads=self.heads, mlp_dim=self.mlp_dim,
            act="relu", dropout=self.dropout, attn_dropout=self.dropout, norm_first=False,
            attn_impl=self.attn_impl,
        )  # fmt: skip

    @property
    def decoder(self) -> TransformerConfig:
        return TransformerConfig(
            width=self.width, layers=self.decoder_layers, heads=self.heads, mlp_dim=self.mlp_dim,
            act="relu", dropout=self.dropout, attn_dropout=self.dropout, norm_first=False,
            cross_dim=self.width, attn_impl=self.attn_impl,
        )  # fmt: skip

    @property
    def max_tokens(self) -> int:
        """The longest text: within the soft-token head and RoBERTa's positions."""
        return min(self.classes, self.text.max_positions - self.text.pad_id - 1)

    @property
    def pos_scale(self) -> float:
        return 2 * math.pi  # DETR's normalised sine positions span [0, 2 pi]

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (for ``config.json``); inverse of :meth:`from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MDETRConfig:
        """The config :meth:`to_dict` wrote."""
        return cls(**d)


def mdetr_resnet101() -> MDETRConfig:
    """TorchMultimodal's ``mdetr_for_phrase_grounding`` (``mdetr_resnet101`` plus the
    64-d alignment head): ResNet-101, RoBERTa base, 6 + 6 layers of width 256, 100
    queries, 255 token classes."""
    return MDETRConfig()


def mdetr_resnet50() -> MDETRConfig:
    """As :func:`mdetr_resnet101` on a ResNet-50 backbone."""
    return MDETRConfig(backbone=ResNetConfig(depths=(3, 4, 6, 3)))


def mdetr_tiny(*, vocab_size: int = 64) -> MDETRConfig:
    """An MDETR for tests on a laptop CPU: a ResNet of one block per stage at width 4
    (128 feature channels), a 2-layer text encoder of width 32, 1 + 1 layers of width
    32, 6 queries, 16 token classes, 64-pixel images, 4 boxes."""
    text = BertConfig(
        vocab_size=vocab_size, width=32, layers=2, heads=2, mlp_dim=64, max_positions=34,
        type_vocab_size=1, norm_eps=1e-5, pad_id=1, pooler=False,
    )  # fmt: skip
    return MDETRConfig(
        backbone=ResNetConfig(depths=(1, 1, 1, 1), width=4), text=text, width=32, heads=2,
        encoder_layers=1, decoder_layers=1, mlp_dim=64, queries=6, classes=16,
        contrastive_dim=16, image_size=64, max_boxes=4,
    )  # fmt: skip


PRESETS = {
    "mdetr_resnet101": mdetr_resnet101,
    "mdetr_resnet50": mdetr_resnet50,
    "mdetr_tiny": mdetr_tiny,
}
