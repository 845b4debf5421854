"""Laws of the contrastive loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fmm import random
from fmm.losses import MAX_LOGIT_SCALE, contrastive_loss


def _pairs(seed, b, e=5):
    k1, k2 = random.split(random.key(seed))
    img = F.normalize(random.normal(k1, (b, e)), dim=-1)
    txt = F.normalize(random.normal(k2, (b, e)), dim=-1)
    return img, txt


@given(b=st.integers(1, 9), seed=st.integers(0, 1000))
def test_symmetric_in_image_and_text(b, seed):
    img, txt = _pairs(seed, b)
    s = torch.tensor(2.0)
    torch.testing.assert_close(contrastive_loss(img, txt, s), contrastive_loss(txt, img, s))


@given(b=st.integers(2, 9), seed=st.integers(0, 1000))
def test_invariant_to_permuting_pairs(b, seed):
    img, txt = _pairs(seed, b)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    s = torch.tensor(1.5)
    torch.testing.assert_close(
        contrastive_loss(img[perm], txt[perm], s), contrastive_loss(img, txt, s)
    )


def test_matches_the_written_out_formula():
    img, txt = _pairs(0, 6)
    s = torch.tensor(math.log(1 / 0.07))
    logits = s.exp() * img @ txt.T
    labels = torch.arange(6)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, s), want)


def test_perfect_alignment_beats_random():
    img, txt = _pairs(1, 8)
    s = torch.tensor(3.0)
    assert contrastive_loss(img, img, s) < contrastive_loss(img, txt, s)


def test_temperature_clamp_is_a_projection():
    img, txt = _pairs(2, 4)
    above = torch.tensor(MAX_LOGIT_SCALE + 1.0)
    g = torch.func.grad(lambda s: contrastive_loss(img, txt, s))(above)
    assert g == 0  # clamped: no gradient pushes it further
    assert above == MAX_LOGIT_SCALE + 1.0  # and the param itself is untouched
    torch.testing.assert_close(
        contrastive_loss(img, txt, above), contrastive_loss(img, txt, torch.tensor(MAX_LOGIT_SCALE))
    )


def test_gather_function_sees_global_negatives():
    img, txt = _pairs(3, 6)
    s = torch.tensor(1.0)
    # Two "ranks" simulated in one process: rank 1 holds rows 3..5 and gathers all six.

    def gather(x):
        return (img if x.data_ptr() == img[3:].data_ptr() else txt), 3

    local = contrastive_loss(img[3:], txt[3:], s, gather=gather)
    logits = s.exp() * img[3:] @ txt.T
    want = (
        F.cross_entropy(logits, torch.arange(3, 6))
        + F.cross_entropy(s.exp() * txt[3:] @ img.T, torch.arange(3, 6))
    ) / 2
    torch.testing.assert_close(local, want)


def test_mismatched_shapes_name_both():
    with pytest.raises(ValueError, match=r"\(3, 5\) and \(4, 5\)"):
        contrastive_loss(torch.ones(3, 5), torch.ones(4, 5), torch.tensor(1.0))
