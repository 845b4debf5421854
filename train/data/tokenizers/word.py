"""`WordTokenizer`: the closed word-level vocabulary of the built-in shapes world."""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from train.data.shapes import WorldConfig, vocabulary

_SPECIALS = ("<pad>", "<unk>", "<sot>")
_PUNCTUATION = str.maketrans("", "", ".,!?")
_JSON_KIND = "fmm.WordTokenizer"


def _normalise(text: str) -> list[str]:
    return text.lower().translate(_PUNCTUATION).split()


class WordTokenizer:
    """Word-level tokenizer. ids: 0=<pad>, 1=<unk>, 2=<sot>, words 3.., and the LAST id
    (vocab_size-1) is <eot>, so the end-of-text position is tokens.argmax(-1) (CLIP's convention).

    Example: `WordTokenizer.for_world(WorldConfig()).encode("a red circle", 8)` is [1, 8].
    """

    pad_id = 0
    unk_id = 1
    sot_id = 2

    def __init__(self, words: Sequence[str]):
        if isinstance(words, str):
            raise TypeError("words must be a sequence of strings, not a single string")
        words = list(words)
        for word in words:
            if not isinstance(word, str):
                raise TypeError(f"words must all be str, got {type(word).__name__}: {word!r}")
            # A word that normalisation would change could never be produced by `encode`.
            if _normalise(word) != [word] or word in (*_SPECIALS, "<eot>"):
                raise ValueError(
                    f"words entry {word!r} must be one lowercase word without .,!? "
                    "and not a special token"
                )
        duplicates = sorted({w for w in words if words.count(w) > 1})
        if duplicates:
            raise ValueError(f"words has duplicates: {duplicates}")
        self._words = tuple(words)
        self._ids = {w: i + len(_SPECIALS) for i, w in enumerate(words)}

    @classmethod
    def for_world(cls, cfg: WorldConfig) -> WordTokenizer:
        """The tokenizer covering every caption and prompt template of cfg's shapes world."""
        return cls(vocabulary(cfg))

    @property
    def words(self) -> tuple[str, ...]:
        """The non-special words, in id order (word i has id i + 3)."""
        return self._words

    @property
    def vocab_size(self) -> int:
        return len(self._words) + len(_SPECIALS) + 1

    @property
    def eot_id(self) -> int:
        return self.vocab_size - 1

    def encode(self, texts: Sequence[str] | str, context_length: int) -> torch.Tensor:
        """Token ids [batch, context_length] int64: <sot> words... <eot>, then <pad> (0).

        Text is lowercased, stripped of .,!? and split on whitespace; unknown words become
        <unk>. Too-long text is cut so that <eot> is still the last non-pad token.

        Example: `tok.encode(["a red circle"], 6)` -> [[sot, a, red, circle, eot, 0]].
        """
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(
                f"context_length must be an int >= 2 (room for <sot> and <eot>), "
                f"got {context_length!r}"
            )
        if isinstance(texts, str):
            texts = [texts]
        tokens = torch.full((len(texts), context_length), self.pad_id, dtype=torch.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] must be str, got {type(text).__name__}: {text!r}")
            ids = [self._ids.get(w, self.unk_id) for w in _normalise(text)]
            ids = [self.sot_id, *ids[: context_length - 2], self.eot_id]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Texts for token ids [batch, L] (or one row [L]); stops at <eot>.

        <pad>, <sot> and <eot> are skipped; <unk> is kept as "<unk>" so lost words stay visible.

        Example: `tok.decode(tok.encode(caption, 32)) == [caption]` for in-vocabulary captions.
        """
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() not in (1, 2):
            raise ValueError(
                f"ids must be an integer tensor [batch, L] or [L], "
                f"got dtype {ids.dtype} shape {tuple(ids.shape)}"
            )
        rows = ids.reshape(-1, ids.shape[-1]).tolist()
        names = (*_SPECIALS, *self._words, "<eot>")
        texts = []
        for row in rows:
            words = []
            for i in row:
                if not 0 <= i < self.vocab_size:
                    raise ValueError(f"ids must lie in [0, {self.vocab_size}), got {i}")
                if i == self.eot_id:
                    break
                if i not in (self.pad_id, self.sot_id):
                    words.append(names[i])
            texts.append(" ".join(words))
        return texts

    def to_json(self) -> str:
        """A JSON string from which `from_json` rebuilds an identical tokenizer."""
        return json.dumps({"kind": _JSON_KIND, "version": 1, "words": list(self._words)})

    @classmethod
    def from_json(cls, s: str) -> WordTokenizer:
        """Inverse of `to_json`. Example: `WordTokenizer.from_json(tok.to_json())`."""
        data = json.loads(s)
        if not isinstance(data, dict) or data.get("kind") != _JSON_KIND:
            raise ValueError(f"s is not a {_JSON_KIND} JSON document")
        if data.get("version") != 1:
            raise ValueError(f"s has unsupported version {data.get('version')!r}; expected 1")
        return cls(data["words"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and self._words == other._words

    def __hash__(self) -> int:
        return hash(self._words)

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"
