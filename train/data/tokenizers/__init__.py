"""Tokenizers: the shapes world's word-level vocabulary, and pretrained-text tokenizers.

- `WordTokenizer`: the closed vocabulary of the built-in shapes world. Ids follow CLIP's
  layout: <sot> first, and <eot> holds the largest id, so the end-of-text position of each
  row is `tokens.argmax(-1)` with no lookup table.
- `CLIPTokenizer`: OpenAI CLIP's byte-level BPE (the merges file open_clip ships), equal to
  `open_clip.tokenize`; `CLIPRunTokenizer` is it as a fine-tuned run's tokenizer.
- `WordPieceTokenizer`: BERT's uncased WordPiece, equal to `transformers.BertTokenizerFast`.
- `BPETokenizer`: a byte-level BPE trained on a run's own captions (``--data`` from scratch).

A run saves its tokenizer as ``tokenizer.json``; :func:`tokenizer_from_json` reads any of
them back by the document's ``"kind"``.

The last three are `tokenizers.Tokenizer` pipelines (Hugging Face's Rust library); this package
only assembles them (from vocabulary files, or trained) and adds the text cleaning CLIP does
in Python.
"""

import json

from train.data.tokenizers.bpe import BPETokenizer
from train.data.tokenizers.clip import CLIPRunTokenizer, CLIPTokenizer
from train.data.tokenizers.word import WordTokenizer
from train.data.tokenizers.wordpiece import WordPieceTokenizer

# "kind" of a saved tokenizer.json -> the reader of that document.
READERS = {
    "fmm.WordTokenizer": WordTokenizer.from_json,
    "fmm.BPETokenizer": BPETokenizer.from_json,
    "fmm.CLIPTokenizer": CLIPRunTokenizer.from_json,
}


def tokenizer_from_json(text: str):
    """The tokenizer a ``tokenizer.json`` holds, by its ``"kind"`` (:data:`READERS`); a
    document without one is read as a `WordTokenizer` (the first runs' form).

    Example: ``tokenizer_from_json(tok.to_json())`` rebuilds ``tok`` of any kind.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer.json is not JSON: {e}") from None
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind is None:
        return WordTokenizer.from_json(text)
    if kind not in READERS:
        raise ValueError(f"tokenizer.json: unknown kind {kind!r} (known: {sorted(READERS)})")
    return READERS[kind](text)


__all__ = [
    "READERS",
    "BPETokenizer",
    "CLIPRunTokenizer",
    "CLIPTokenizer",
    "WordPieceTokenizer",
    "WordTokenizer",
    "tokenizer_from_json",
]
