"""GPT's static configuration and its presets (the builders)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fmm.nn import TransformerConfig
from fmm.nn.towers import TextConfig


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Every static choice of a decoder-only GPT with tied input/output embeddings.

    The dataclass is GPT's component builder: pass any sizes; presets below fix published
    ones. ``act`` defaults to GPT-2's tanh-approximated GELU. Hashable, so ``torch.compile``
    guards on it cheaply.
    """

    vocab_size: int
    context_length: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    mlp_dim: int | None = None
    act: str = "gelu_tanh"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attn_dropout: float = 0.0
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "width", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig: {name} must be positive, got {getattr(self, name)}")
        self.transformer  # noqa: B018  (validates width/heads/layers/activation now)

    @property
    def transformer(self) -> TransformerConfig:
        return TransformerConfig(
            width=self.width, layers=self.layers, heads=self.heads, mlp_ratio=self.mlp_ratio,
            mlp_dim=self.mlp_dim, act=self.act, norm_eps=self.norm_eps, dropout=self.dropout,
            attn_dropout=self.attn_dropout, attn_impl=self.attn_impl,
        )  # fmt: skip

    @property
    def tower(self) -> TextConfig:
        """The shared text tower as GPT configures it: causal, learned positions, a final
        layer norm, ``dropout`` on the embeddings as in every block."""
        return TextConfig(
            vocab_size=self.vocab_size, context_length=self.context_length,
            transformer=self.transformer, causal=True, dropout=self.dropout,
        )  # fmt: skip

    @property
    def decoder_spec(self):
        """The :class:`fmm.decoding.DecoderSpec` of this config, for cached decoding."""
        from models.gpt.model import decoder_spec  # the model module imports this one

        return decoder_spec(self)

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (for ``config.json``)."""
        return asdict(self)


def gpt2_small() -> GPTConfig:
    """GPT-2 small (124M): vocab 50257, context 1024, width 768 x 12 layers, 12 heads."""
    return GPTConfig(vocab_size=50257, context_length=1024, width=768, layers=12, heads=12)


def gpt2_medium() -> GPTConfig:
    """GPT-2 medium (355M): width 1024 x 24 layers, 16 heads."""
    return GPTConfig(vocab_size=50257, context_length=1024, width=1024, layers=24, heads=16)


def gpt_tiny(*, vocab_size: int = 64, context_length: int = 64) -> GPTConfig:
    """A GPT for tests and the built-in data on a laptop CPU: width 64 x 2 layers, 4 heads."""
    return GPTConfig(
        vocab_size=vocab_size, context_length=context_length, width=64, layers=2, heads=4
    )
