"""`BPETokenizer`: a byte-level BPE trained on a run's own captions (Hugging Face
`tokenizers`), for models trained from scratch on a user's data.

Ids follow CLIP's layout, as `WordTokenizer`'s do: <pad> is 0, <sot> 1, the learned
vocabulary after them, and <eot> the LAST id, so each row's end-of-text position is
`tokens.argmax(-1)`. Text is NFKC-normalised and lowercased before byte-level splitting.

Example::

    tok = BPETokenizer.train(["a photo of a dog", "two cats on a sofa"], vocab_size=300)
    tok.encode(["a dog"], 8)          # [1, 8] int64: <sot> ... <eot> then <pad>
    BPETokenizer.from_json(tok.to_json()).encode(["a dog"], 8)   # the same ids
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import torch

from train.data.tokenizers._checks import as_texts, check_length

_JSON_KIND = "fmm.BPETokenizer"
_PAD, _SOT, _EOT = "<pad>", "<sot>", "<eot>"
DEFAULT_VOCAB = 8192  # an upper bound: on small data the trainer runs out of merges first


class BPETokenizer:
    """Byte-level BPE over a trained `tokenizers.Tokenizer`; see the module docstring."""

    pad_id = 0
    sot_id = 1

    def __init__(self, tokenizer):
        self._tok = tokenizer
        # <eot> was added last, so it is the largest id: CLIP's argmax convention holds.
        self.eot_id = tokenizer.token_to_id(_EOT)
        if (
            tokenizer.token_to_id(_PAD) != self.pad_id
            or tokenizer.token_to_id(_SOT) != self.sot_id
            or self.eot_id != tokenizer.get_vocab_size() - 1
        ):
            raise ValueError(
                f"not an {_JSON_KIND}: <pad>, <sot> must be ids 0, 1 and <eot> the last id"
            )

    @classmethod
    def train(
        cls, texts: Iterable[str], *, vocab_size: int = DEFAULT_VOCAB, min_frequency: int = 2
    ) -> BPETokenizer:
        """A tokenizer trained on ``texts`` with at most ``vocab_size`` ids (specials
        included; the 256 byte symbols are always in)."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        check_length(vocab_size, "vocab_size", 260)
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 1,  # <eot> joins after training
            min_frequency=min_frequency,
            special_tokens=[_PAD, _SOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        tok.add_special_tokens([_EOT])
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, texts: Sequence[str] | str, context_length: int) -> torch.Tensor:
        """Token ids ``[batch, context_length]`` int64: <sot> ids... <eot>, then <pad> (0);
        too-long text is cut so that <eot> stays the last non-pad token.

        Example: ``tok.encode(["a dog"], 6)`` -> ``[[1, id("Ġa"), id("Ġdog"), eot, 0, 0]]``.
        """
        check_length(context_length, "context_length", 2)
        texts = as_texts(texts, "texts")
        tokens = torch.full((len(texts), context_length), self.pad_id, dtype=torch.int64)
        for row, enc in enumerate(self._tok.encode_batch(texts, add_special_tokens=False)):
            ids = [self.sot_id, *enc.ids[: context_length - 2], self.eot_id]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Texts for ids ``[batch, L]`` (or ``[L]``), stopping at <eot> (normalised text:
        lowercased)."""
        rows = ids.reshape(-1, ids.shape[-1]).tolist()
        out = []
        for row in rows:
            row = row[: row.index(self.eot_id)] if self.eot_id in row else row
            kept = [i for i in row if i not in (self.pad_id, self.sot_id)]
            out.append(self._tok.decode(kept).strip())
        return out

    def to_json(self) -> str:
        """A JSON string from which `from_json` (or `tokenizer_from_json`) rebuilds it."""
        return json.dumps(
            {"kind": _JSON_KIND, "version": 1, "tokenizer": json.loads(self._tok.to_str())}
        )

    @classmethod
    def from_json(cls, s: str) -> BPETokenizer:
        """Inverse of `to_json`."""
        from tokenizers import Tokenizer

        data = json.loads(s)
        if not isinstance(data, dict) or data.get("kind") != _JSON_KIND:
            raise ValueError(f"s is not a {_JSON_KIND} JSON document")
        if data.get("version") != 1:
            raise ValueError(f"s has unsupported version {data.get('version')!r}; expected 1")
        return cls(Tokenizer.from_str(json.dumps(data["tokenizer"])))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"
