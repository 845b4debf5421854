"""BPETokenizer: trained on captions, CLIP's id layout, exact JSON round trip, the dispatch."""

import pickle

import pytest
import torch

from train.data import WordTokenizer, WorldConfig, sample_scenes
from train.data.tokenizers import BPETokenizer, tokenizer_from_json

CAPTIONS = [
    "a photo of a dog on the grass",
    "two cats asleep on a red sofa",
    "a dog chasing a ball",
    "A Photo of a CAT",
    "café au lait, s'il vous plaît",
] * 4


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(CAPTIONS, vocab_size=400)


def test_layout_and_padding(tok):
    ids = tok.encode(["a dog", "a photo of a dog on the grass"], 6)
    assert ids.dtype == torch.int64 and ids.shape == (2, 6)
    assert ids[:, 0].tolist() == [tok.sot_id, tok.sot_id]
    # <eot> is the largest id, so argmax finds it; the short row is padded with 0 after it.
    assert tok.eot_id == tok.vocab_size - 1
    assert ids.argmax(-1).tolist() == [ids[0].tolist().index(tok.eot_id), 5]
    assert ids[0, ids[0].argmax() + 1 :].tolist() == [0] * (5 - int(ids[0].argmax()))
    assert tok.vocab_size <= 400


def test_words_seen_in_training_are_one_token_and_text_round_trips(tok):
    ids = tok.encode(["a dog"], 8)[0].tolist()
    assert ids[: ids.index(tok.eot_id) + 1] == [tok.sot_id, *ids[1:3], tok.eot_id]
    assert tok.decode(tok.encode(CAPTIONS[:5], 32)) == [c.lower() for c in CAPTIONS[:5]]
    # Bytes never seen still encode (byte-level): no unknown token is needed.
    assert tok.decode(tok.encode(["zebra 🦓"], 32)) == ["zebra 🦓"]


def test_json_pickle_and_dispatch_give_the_same_ids(tok):
    texts = [*CAPTIONS[:5], "an unseen sentence"]
    want = tok.encode(texts, 16)
    for again in (
        BPETokenizer.from_json(tok.to_json()),
        tokenizer_from_json(tok.to_json()),
        pickle.loads(pickle.dumps(tok)),  # DataLoader workers receive it
    ):
        assert isinstance(again, BPETokenizer)
        assert torch.equal(again.encode(texts, 16), want)


def test_dispatch_reads_word_tokenizers_and_refuses_unknown_kinds():
    word = WordTokenizer.for_world(WorldConfig())
    assert tokenizer_from_json(word.to_json()) == word
    with pytest.raises(ValueError, match="unknown kind 'nope'"):
        tokenizer_from_json('{"kind": "nope"}')
    with pytest.raises(ValueError, match="not JSON"):
        tokenizer_from_json("{")


def test_shapes_world_captions_get_a_small_vocabulary():
    scenes = sample_scenes(WorldConfig(), 400, generator=torch.Generator().manual_seed(0))
    tok = BPETokenizer.train(scenes.captions)
    # Whole words merge: every caption is at most one token per word plus <sot>/<eot>.
    lengths = (tok.encode(scenes.captions, 32) != 0).sum(-1)
    words = torch.tensor([len(c.split()) for c in scenes.captions])
    assert bool((lengths <= words + 2).all())
    assert tok.vocab_size < 512


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(CAPTIONS, vocab_size=10)
    with pytest.raises(ValueError, match="context_length"):
        BPETokenizer.train(CAPTIONS, vocab_size=300).encode(["a"], 1)
