"""`CLIPTokenizer`: OpenAI CLIP's byte-level BPE, equal to `open_clip.tokenize`."""

from __future__ import annotations

import gzip
import html
import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import ftfy
import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
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

# OpenAI's tokenizer keeps only the first 49152 - 256 - 2 merges of the file, so the
# vocabulary is 256 bytes, the same 256 ending a word, the merges and two specials: 49408.
_CLIP_NUM_MERGES = 49152 - 256 - 2
_CLIP_SOT, _CLIP_EOT = "<start_of_text>", "<end_of_text>"
_CLIP_WORD_END = "</w>"
# open_clip's word pattern, which it runs with the `regex` module and IGNORECASE on
# lower-cased text, rewritten for the Oniguruma engine of `tokenizers`. Case folding is
# spelled out: there "'s" also matches "'ſ" (long s folds to s), and U+0345 (a combining
# mark that folds to a Greek letter) is excluded from every class, so it is dropped like
# whitespace. Checked over every code point assigned in Unicode 14; characters assigned
# later may be classified differently by the two engines' Unicode tables.
_CLIP_PATTERN = (
    rf"{_CLIP_SOT}|{_CLIP_EOT}|'[s\x{{017F}}]|'t|'re|'ve|'m|'ll|'d"
    r"|\p{L}+|\p{N}|[^\s\p{L}\p{N}\x{0345}]+"
)


def _byte_chars() -> dict[int, str]:
    """Byte -> the printable character standing for it, in CLIP's (and GPT-2's) id order.

    Printable latin-1 bytes stand for themselves and come first; the other 68 (controls,
    space, soft hyphen) move to U+0100 onwards, so every token is a visible string.
    """
    own = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in own]
    return {**{b: chr(b) for b in own}, **{b: chr(0x100 + i) for i, b in enumerate(moved)}}


def _clip_clean(text: str) -> str:
    # Exactly open_clip's default cleaning. ftfy (mojibake, ligatures, full-width forms) has
    # no `tokenizers` normalizer, and str.lower differs from the Lowercase normalizer (a
    # final capital sigma becomes ς here), so the whole step stays in Python.
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _read_clip_merges(path: Path) -> list[tuple[str, str]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines[-1] == "":  # a final newline
            lines.pop()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(
            f"path {str(path)!r} is not a gzip-compressed BPE merges file such as "
            f"bpe_simple_vocab_16e6.txt.gz ({e})"
        ) from None
    rows = lines[1 : 1 + _CLIP_NUM_MERGES]  # line 0 is a "#version" header
    merges = [tuple(row.split()) for row in rows]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
        raise ValueError(
            f"path {str(path)!r} line {bad + 2} is {rows[bad]!r}; a BPE merges file has two "
            "space-separated symbols per line"
        )
    if len(merges) < _CLIP_NUM_MERGES:
        raise ValueError(
            f"path {str(path)!r} has {len(merges)} merges; CLIP's vocabulary needs "
            f"{_CLIP_NUM_MERGES}"
        )
    return merges


class CLIPTokenizer:
    """OpenAI CLIP's tokenizer: the same ids as `open_clip.tokenize`.

    Text is cleaned (ftfy, HTML entities, whitespace runs, lower case), split into words by
    CLIP's pattern, and each word's UTF-8 bytes are merged by BPE. Rows are
    `<start_of_text> ... <end_of_text>` then zeros; too-long text is cut so that
    `<end_of_text>` stays the last id. Example::

        tok = CLIPTokenizer.from_vocab("bpe_simple_vocab_16e6.txt.gz")
        tok(["a photo of a cat"])  # [1, 77]: 49406, 320, 1125, 539, 320, 2368, 49407, 0, ...
    """

    def __init__(self, merges: Sequence[tuple[str, str]], *, context_length: int = 77):
        self._context_length = check_length(context_length, "context_length", 2)
        self.merges = tuple(tuple(m) for m in merges)
        space = _byte_chars()[ord(" ")]
        alphabet = list(_byte_chars().values())
        tokens = [
            *alphabet,
            *(c + _CLIP_WORD_END for c in alphabet),
            *("".join(m) for m in merges),
            _CLIP_SOT,
            _CLIP_EOT,
        ]
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("merges produce duplicate tokens; is this CLIP's merges file?")
        tok = Tokenizer(
            models.BPE(vocab=vocab, merges=list(merges), end_of_word_suffix=_CLIP_WORD_END)
        )
        self._splitter = pre_tokenizers.Split(Regex(_CLIP_PATTERN), "removed", invert=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [self._splitter, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in (_CLIP_SOT, _CLIP_EOT)]
        )
        # "</w>" becomes the byte-level space, so bytes and word breaks decode in one pass.
        tok.decoder = decoders.Sequence(
            [decoders.Replace(_CLIP_WORD_END, space), decoders.ByteLevel()]
        )
        self._tok = tok
        self._rows = Tokenizer.from_str(tok.to_str())
        self._rows.post_processor = processors.TemplateProcessing(
            single=f"{_CLIP_SOT} $A {_CLIP_EOT}",
            special_tokens=[(_CLIP_SOT, self.sot_id), (_CLIP_EOT, self.eot_id)],
        )
        # Truncation counts the two specials, so the text keeps context_length - 2 ids.
        self._rows.enable_truncation(self._context_length)
        self._rows.enable_padding(length=self._context_length, pad_id=0, pad_token=alphabet[0])

    @classmethod
    def from_vocab(cls, path: str | Path, *, context_length: int = 77) -> CLIPTokenizer:
        """The tokenizer from OpenAI's merges file (gzip text, `bpe_simple_vocab_16e6.txt.gz`).

        Example: `CLIPTokenizer.from_vocab(path, context_length=32)(texts)` is [n, 32].
        """
        check_length(context_length, "context_length", 2)
        return cls(_read_clip_merges(existing_file(path, "path")), context_length=context_length)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def sot_id(self) -> int:
        return self._tok.token_to_id(_CLIP_SOT)

    @property
    def eot_id(self) -> int:
        return self._tok.token_to_id(_CLIP_EOT)

    def _words(self, text: str) -> list[str]:
        # Split here rather than inside the pipeline so a literal "<end_of_text>" becomes the
        # special id only where CLIP's pattern isolates it: in "!<end_of_text>" the pattern
        # reads "!<" as punctuation, while the added-token matcher would find it anywhere.
        return [word for word, _ in self._splitter.pre_tokenize_str(_clip_clean(text))]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids [n, context_length] int64 for n texts (a single str counts as one).

        Example: `tok(["a dog", "a cat"]).argmax(-1)` is each row's <end_of_text> position.
        """
        words = [self._words(t) for t in as_texts(texts, "texts")]
        rows = [e.ids for e in self._rows.encode_batch(words, is_pretokenized=True)]
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), self._context_length)

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without <start_of_text>/<end_of_text> and never cut.

        Example: `tok.encode("a cat")` is [320, 2368].
        """
        words = self._words(as_text(text, "text"))
        return self._tok.encode(words, is_pretokenized=True, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The cleaned text of ids [seq] (a row of `__call__` or `encode`'s list).

        Drops the specials and the zeros after the last <end_of_text> (padding). Words come
        back lower-cased and split as CLIP split them, one space apart.

        Example: `tok.decode(tok("A photo of a CAT!")[0])` is "a photo of a cat !".
        """
        ids = as_ids(ids, self.vocab_size)
        # Only zeros after the last <end_of_text> are padding: an <end_of_text> typed in the
        # text (encode keeps it) is followed by more words, whose last id ends a word (>= 256).
        end = len(ids) - ids[::-1].index(self.eot_id) - 1 if self.eot_id in ids else len(ids)
        if not any(ids[end + 1 :]):
            ids = ids[:end]
        return self._tok.decode(ids, skip_special_tokens=True).removesuffix(" ")

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


_JSON_KIND = "fmm.CLIPTokenizer"


class CLIPRunTokenizer:
    """CLIP's BPE as a run's tokenizer, with the interface of `WordTokenizer` and
    `BPETokenizer`: `encode(texts, context_length) -> [n, context_length]` int64 (the ids of
    `open_clip.tokenize`), `vocab_size`, `eot_id` (the largest id: rows pool at `argmax`),
    and `to_json`, whose document holds the merges: a fine-tuned run's `tokenizer.json`
    rebuilds it (`tokenizer_from_json`) without the vocabulary file.

    Example::

        tok = CLIPRunTokenizer.from_vocab("bpe_simple_vocab_16e6.txt.gz")
        tok.encode(["a photo of a cat"], 77)   # == open_clip.tokenize(["a photo of a cat"])
        CLIPRunTokenizer.from_json(tok.to_json()).encode(["a cat"], 16)  # the same ids
    """

    pad_id = 0

    def __init__(self, merges: Sequence[tuple[str, str]]):
        self._by_length = {77: CLIPTokenizer(merges)}  # one pipeline per context length

    @classmethod
    def from_vocab(cls, path: str | Path) -> CLIPRunTokenizer:
        """The tokenizer of OpenAI's merges file (``bpe_simple_vocab_16e6.txt.gz``)."""
        return cls(_read_clip_merges(existing_file(path, "path")))

    def rows(self, context_length: int) -> CLIPTokenizer:
        """The `CLIPTokenizer` that writes rows of ``context_length`` ids."""
        if context_length not in self._by_length:
            merges = self._by_length[77].merges
            self._by_length[context_length] = CLIPTokenizer(merges, context_length=context_length)
        return self._by_length[context_length]

    @property
    def vocab_size(self) -> int:
        return self._by_length[77].vocab_size

    @property
    def sot_id(self) -> int:
        return self._by_length[77].sot_id

    @property
    def eot_id(self) -> int:
        return self._by_length[77].eot_id

    def encode(self, texts: Sequence[str] | str, context_length: int) -> torch.Tensor:
        """Token ids ``[n, context_length]`` int64: <start_of_text> ... <end_of_text>, zeros."""
        return self.rows(context_length)(texts)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """The cleaned texts of rows ``[n, L]`` (or one row ``[L]``)."""
        return [self._by_length[77].decode(row) for row in ids.reshape(-1, ids.shape[-1])]

    def to_json(self) -> str:
        """A JSON document (kind ``fmm.CLIPTokenizer``) holding the merges."""
        merges = [" ".join(m) for m in self._by_length[77].merges]
        return json.dumps({"kind": _JSON_KIND, "version": 1, "merges": merges})

    @classmethod
    def from_json(cls, s: str) -> CLIPRunTokenizer:
        """Inverse of `to_json`; a document of another kind or version is a ``ValueError``."""
        data = json.loads(s)
        if not isinstance(data, dict) or data.get("kind") != _JSON_KIND:
            raise ValueError(f"s is not a {_JSON_KIND} JSON document")
        if data.get("version") != 1:
            raise ValueError(f"s has unsupported version {data.get('version')!r}; expected 1")
        merges = [tuple(m.split(" ")) for m in data.get("merges", ())]
        if len(merges) != _CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"s: a {_JSON_KIND} holds {_CLIP_NUM_MERGES} merges of two symbols")
        return cls(merges)

    def __getstate__(self) -> dict:  # for DataLoader workers: the merges, not the pipelines
        return {"merges": self._by_length[77].merges}

    def __setstate__(self, state: dict) -> None:
        self._by_length = {77: CLIPTokenizer(state["merges"])}

    def __repr__(self) -> str:
        return f"CLIPRunTokenizer(vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------
# BERT: WordPiece over lower-cased, accent-stripped words.
