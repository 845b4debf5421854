"""BERT's static configuration and its presets (the builders)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fmm.nn import TransformerConfig
from fmm.nn.towers import TextConfig

_INIT_STD = 0.02  # BERT's initializer_range, for embeddings and the pooler


@dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Every static choice of a BERT-style text encoder: post-norm blocks, word + learned
    position + token-type embeddings with their own LayerNorm, and an optional pooler.

    The dataclass is BERT's component builder: pass any sizes; presets below fix published
    ones. ``mlp_dim`` is the intermediate width as an integer, as checkpoints state it.
    ``act`` defaults to exact (erf) GELU, ``norm_eps`` to BERT's 1e-12. Hashable, so
    ``torch.compile`` guards on it cheaply.

    The masked-LM objective (:func:`models.bert.loss`): ``mask_id`` replaces a hidden token,
    ``special_ids`` are never hidden (nor is padding), ``mask_rate`` is the share hidden.
    The defaults are the ids of Google's BERT WordPiece vocabularies ([MASK] 103, [CLS] 101,
    [SEP] 102); the loss refuses ids outside ``vocab_size``.
    """

    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    max_positions: int = 512
    type_vocab_size: int = 2
    act: str = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.1
    attn_dropout: float = 0.1
    pad_id: int = 0
    pooler: bool = True
    attn_impl: str = "sdpa"
    mask_id: int = 103
    special_ids: tuple[int, ...] = (101, 102)
    mask_rate: float = 0.15

    def __post_init__(self) -> None:
        object.__setattr__(self, "special_ids", tuple(self.special_ids))  # JSON gives a list
        if self.mask_id < 0 or any(i < 0 for i in self.special_ids):
            raise ValueError(
                f"BertConfig: mask_id={self.mask_id} and special_ids={self.special_ids} must "
                "be token ids >= 0"
            )
        if not 0.0 <= self.mask_rate <= 1.0:
            raise ValueError(f"BertConfig: mask_rate must be in [0, 1], got {self.mask_rate}")
        for name in ("vocab_size", "width", "heads", "mlp_dim", "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"BertConfig: {name} must be positive, got {getattr(self, name)}")
        if self.type_vocab_size < 1:
            raise ValueError(
                f"BertConfig: type_vocab_size must be positive, got {self.type_vocab_size}"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"BertConfig: pad_id={self.pad_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        self.transformer  # noqa: B018  (validates width/heads/layers/activation now)

    @property
    def transformer(self) -> TransformerConfig:
        return TransformerConfig(
            width=self.width, layers=self.layers, heads=self.heads, mlp_dim=self.mlp_dim,
            act=self.act, norm_eps=self.norm_eps, dropout=self.dropout,
            attn_dropout=self.attn_dropout, attn_impl=self.attn_impl, norm_first=False,
        )  # fmt: skip

    @property
    def tower(self) -> TextConfig:
        """The shared text tower BERT is: word + position + token-type embeddings with their
        LayerNorm, post-norm blocks, no final norm (:func:`fmm.nn.towers.text`)."""
        return TextConfig(
            vocab_size=self.vocab_size, context_length=self.max_positions,
            transformer=self.transformer, type_vocab_size=self.type_vocab_size,
            norm_embed=True, norm=False, token_std=_INIT_STD, pos_std=_INIT_STD,
            dropout=self.dropout,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (for ``config.json``); inverse of :meth:`from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        """The config :meth:`to_dict` wrote. Example: ``BertConfig.from_dict(c.to_dict()) == c``."""
        return cls(**d)


def bert_base() -> BertConfig:
    """BERT base, uncased (110M): vocab 30522, width 768 x 12 layers, 12 heads, MLP 3072."""
    return BertConfig(vocab_size=30522, width=768, layers=12, heads=12, mlp_dim=3072)


def minilm_l6() -> BertConfig:
    """all-MiniLM-L6-v2 (22.7M): vocab 30522, width 384 x 6 layers, 12 heads, MLP 1536."""
    return BertConfig(vocab_size=30522, width=384, layers=6, heads=12, mlp_dim=1536)


def bert_tiny(*, vocab_size: int = 64, max_positions: int = 64) -> BertConfig:
    """A BERT for tests on a laptop CPU: width 64 x 2 layers, 4 heads, MLP 128. Its masked
    LM uses the ids of ``train.data``'s word tokenizer: ``<unk>`` (1) as [MASK], ``<sot>``
    (2) as [CLS], never masked."""
    return BertConfig(
        vocab_size=vocab_size,
        width=64,
        layers=2,
        heads=4,
        mlp_dim=128,
        max_positions=max_positions,
        mask_id=1,
        special_ids=(2,),
    )
