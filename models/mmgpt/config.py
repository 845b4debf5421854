"""The multimodal GPT's static configuration and its presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fmm.nn import TransformerConfig
from fmm.nn.towers import TextConfig


@dataclass(frozen=True, kw_only=True)
class MMGPTConfig:
    """A decoder-only transformer over ``text_len`` text tokens followed by ``image_len``
    image tokens (VQ-VAE codes).

    Token ids share one space: text ids are ``[0, text_vocab)`` and image code ``c`` is id
    ``text_vocab + c``, so one sampler serves both modalities and a boolean mask over the
    ``vocab_size`` ids picks the modality to sample. Each modality has its own embedding
    table and output head.

    ``text_loss_weight``: weight of next-token loss on the caption (0: caption -> image only).
    """

    text_vocab: int
    text_len: int
    image_vocab: int
    image_len: int
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attn_impl: str = "sdpa"
    text_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("text_vocab", "text_len", "image_vocab", "image_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"MMGPTConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.text_loss_weight < 0:
            raise ValueError(
                f"MMGPTConfig: text_loss_weight must be >= 0, got {self.text_loss_weight}"
            )
        self.transformer  # noqa: B018  (validates width, heads and the activation now)

    @property
    def vocab_size(self) -> int:
        """Text ids then image ids."""
        return self.text_vocab + self.image_vocab

    @property
    def seq_len(self) -> int:
        """The longest sequence: a caption and a whole image."""
        return self.text_len + self.image_len

    @property
    def transformer(self) -> TransformerConfig:
        return TransformerConfig(
            width=self.width, layers=self.layers, heads=self.heads, mlp_ratio=self.mlp_ratio,
            act=self.act, norm_eps=self.norm_eps, dropout=self.dropout, attn_impl=self.attn_impl,
        )  # fmt: skip

    @property
    def tower(self) -> TextConfig:
        """The shared text tower over the joint id space as this model runs it: causal, a
        final norm. The embeddings are the model's own (one table per modality), so only
        the tower's stack and norm run (:func:`fmm.nn.towers.encode_embeddings`)."""
        return TextConfig(
            vocab_size=self.vocab_size, context_length=self.seq_len,
            transformer=self.transformer, causal=True, pos_std=0.02,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (for ``config.json``)."""
        return asdict(self)


def mmgpt_shapes(
    *, text_vocab: int = 64, text_len: int = 16, image_vocab: int = 128, image_len: int = 64
) -> MMGPTConfig:
    """Sized for caption -> image on the shapes world on a CPU: width 128 x 4 layers (~0.8M)."""
    return MMGPTConfig(
        text_vocab=text_vocab, text_len=text_len, image_vocab=image_vocab, image_len=image_len
    )
