"""Tokenizers: the shapes world's word-level vocabulary, and pretrained-text tokenizers.

- `WordTokenizer`: the closed vocabulary of the built-in shapes world. Ids follow CLIP's
  layout: <sot> first, and <eot> holds the largest id, so the end-of-text position of each
  row is `tokens.argmax(-1)` with no lookup table.
- `CLIPTokenizer`: OpenAI CLIP's byte-level BPE (the merges file open_clip ships), equal to
  `open_clip.tokenize`.
- `WordPieceTokenizer`: BERT's uncased WordPiece, equal to `transformers.BertTokenizerFast`.

The last two are `tokenizers.Tokenizer` pipelines (Hugging Face's Rust library); this package
only assembles them from vocabulary files and adds the text cleaning CLIP does in Python.
"""

from train.data.tokenizers.clip import CLIPTokenizer
from train.data.tokenizers.word import WordTokenizer
from train.data.tokenizers.wordpiece import WordPieceTokenizer

__all__ = ["CLIPTokenizer", "WordPieceTokenizer", "WordTokenizer"]
