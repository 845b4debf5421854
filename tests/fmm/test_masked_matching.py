"""Laws of the masked-prediction and image-text matching losses (fmm.losses.masked,
fmm.losses.matching)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fmm import random
from fmm.losses import (
    IGNORE,
    mask_tokens,
    masked_accuracy,
    masked_cross_entropy,
    matching_loss,
    negative_pairs,
    random_mask,
)


def _logits_labels(seed, b, s, v, rate=0.5):
    k1, k2, k3 = random.split(random.key(seed), 3)
    logits = random.normal(k1, (b, s, v)) * 2
    labels = (random.uniform(k2, (b, s)) * v).long()
    keep = random.bernoulli(k3, rate, (b, s))
    return logits, torch.where(keep, labels, torch.full_like(labels, IGNORE))


@given(b=st.integers(1, 5), s=st.integers(1, 7), seed=st.integers(0, 1000))
def test_masked_cross_entropy_is_the_mean_over_scored_positions(b, s, seed):
    logits, labels = _logits_labels(seed, b, s, 5)
    scored = labels != IGNORE
    got = masked_cross_entropy(logits, labels)
    assert torch.isfinite(got)
    if scored.any():
        torch.testing.assert_close(got, F.cross_entropy(logits[scored], labels[scored]))
    else:
        assert got.item() == 0.0


def test_masked_cross_entropy_ignores_unscored_logits_and_has_zero_grad_there():
    logits, labels = _logits_labels(0, 3, 6, 7)
    logits.requires_grad_(True)
    masked_cross_entropy(logits, labels).backward()
    unscored = labels == IGNORE
    assert unscored.any() and (~unscored).any()
    assert (logits.grad[unscored] == 0).all()
    assert (logits.grad[~unscored].abs().sum(-1) > 0).all()


def test_empty_mask_gives_zero_not_nan():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = masked_cross_entropy(logits, torch.full((2, 3), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_masked_accuracy_counts_scored_positions_only():
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    labels = torch.tensor([[1, 1, IGNORE]])
    assert masked_accuracy(logits, labels).item() == 0.5


@given(seed=st.integers(0, 1000), rate=st.floats(0.0, 1.0))
def test_mask_tokens_hides_only_allowed_positions_and_labels_them(seed, rate):
    ids = 3 + (random.uniform(random.key(seed), (4, 9)) * 20).long()
    allowed = ids % 3 != 0
    masked, labels = mask_tokens(random.key(seed + 1), ids, rate=rate, mask_id=99, allowed=allowed)
    hidden = masked == 99
    assert not (hidden & ~allowed).any()
    assert torch.equal(labels[hidden], ids[hidden])
    assert (labels[~hidden] == IGNORE).all() and torch.equal(masked[~hidden], ids[~hidden])
    if rate == 1.0:
        assert torch.equal(hidden, allowed)


def test_masks_are_pure_in_the_key():
    a = random_mask(random.key(4), (3, 11), 0.3)
    assert torch.equal(a, random_mask(random.key(4), (3, 11), 0.3))
    assert not torch.equal(a, random_mask(random.key(5), (3, 11), 0.3))


@given(b=st.integers(1, 9), seed=st.integers(0, 1000))
def test_matching_loss_is_symmetric_in_the_two_classes(b, seed):
    k1, k2 = random.split(random.key(seed))
    logits = random.normal(k1, (b, 2)) * 3
    labels = random.bernoulli(k2, 0.5, (b,)).long()
    loss = matching_loss(logits, labels)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, matching_loss(logits.flip(-1), 1 - labels))


@given(b=st.integers(2, 12), seed=st.integers(0, 1000), rate=st.floats(0.0, 1.0))
def test_negative_pairs_never_pair_an_example_with_itself(b, seed, rate):
    partner, labels = negative_pairs(random.key(seed), b, rate)
    index = torch.arange(b)
    assert partner.dtype == labels.dtype == torch.int64
    assert ((partner >= 0) & (partner < b)).all()
    assert torch.equal(partner == index, labels == 1)
    if rate == 1.0:
        assert (labels == 0).all()
    if rate == 0.0:
        assert (labels == 1).all()


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"logits \[2, 3\]"):
        masked_cross_entropy(torch.randn(2, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be integers"):
        masked_cross_entropy(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"logits must be \[batch, 2\]"):
        matching_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \[batch\]"):
        matching_loss(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch >= 2"):
        negative_pairs(random.key(0), 1)
    with pytest.raises(ValueError, match="allowed"):
        mask_tokens(random.key(0), torch.ones(2, 3, dtype=torch.long), rate=0.5, mask_id=9,
                    allowed=torch.ones(2, 4, dtype=torch.bool))  # fmt: skip
