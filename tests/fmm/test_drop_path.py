"""Laws of stochastic depth: ``fmm.random.drop_path`` (identity off training and at rate 0,
whole rows kept or dropped, unbiased) and the shared block's ``drop_path`` (both residual
branches, each its own key; rate 0 changes no bit).

The masks cannot be compared with torchvision's ``stochastic_depth`` draw for draw: it reads
the global RNG (``Tensor.bernoulli_``), ours is a pure function of the key. The laws below are
what the two share (row mode: one Bernoulli keep per example, kept rows scaled by 1/(1-p)).
"""

import dataclasses

import pytest
import torch

from fmm import random
from fmm.nn import TransformerConfig, block, init_block, layer_norm, mlp
from fmm.nn.attention import attention


def test_identity_in_eval_and_at_rate_zero():
    x = torch.randn(4, 3, 5)
    assert random.drop_path(random.key(0), x, 0.5, train=False) is x
    assert random.drop_path(random.key(0), x, 0.0) is x


def test_whole_rows_are_dropped_or_kept_and_scaled():
    x = torch.randn(64, 3, 5)
    y = random.drop_path(random.key(1), x, 0.25)
    dropped = (y == 0).flatten(1).all(1)
    kept = torch.isclose(y, x / 0.75).flatten(1).all(1)
    assert torch.all(dropped ^ kept)
    assert 0 < int(dropped.sum()) < 64


def test_the_expectation_is_the_input():
    # Over many keys each row survives with probability 1 - p and is scaled by 1 / (1 - p).
    x = torch.randn(4, 6)
    keys = torch.stack([random.fold_in(random.key(2), i) for i in range(4000)])
    draws = torch.func.vmap(lambda k: random.drop_path(k, x, 0.3))(keys)
    # Each entry's mean has std |x| * sqrt(p / (1 - p) / 4000) ~ 0.01 |x|: 6 sigma.
    torch.testing.assert_close(draws.mean(0), x, atol=0.0, rtol=0.065)


def test_a_pure_function_of_the_key():
    x = torch.randn(32, 8)
    a = random.drop_path(random.key(3), x, 0.5)
    assert torch.equal(a, random.drop_path(random.key(3), x, 0.5))
    assert not torch.equal(a, random.drop_path(random.key(4), x, 0.5))


def test_bad_rates_are_refused_by_name():
    for rate in (-0.1, 1.0):
        with pytest.raises(ValueError, match="drop_path rate"):
            random.drop_path(random.key(0), torch.ones(2), rate)
    with pytest.raises(ValueError, match="drop_path must be in"):
        TransformerConfig(width=8, layers=1, heads=2, drop_path=1.0)


CFG = TransformerConfig(width=16, layers=1, heads=2)


def test_a_block_at_rate_zero_or_in_eval_is_unchanged():
    params, x = init_block(CFG, random.key(0)), torch.randn(8, 5, 16)
    plain = block(params, x, cfg=CFG)
    dropped = dataclasses.replace(CFG, drop_path=0.5)
    assert torch.equal(block(params, x, cfg=dropped), plain)
    assert torch.equal(block(params, x, cfg=CFG, key=random.key(1), train=True), plain)
    with pytest.raises(ValueError, match="key= is missing"):
        block(params, x, cfg=dropped, train=True)


def test_a_block_drops_each_branch_per_example_with_its_own_key():
    """Pre-norm: ``x + dp(k_attn, attn(norm1 x))`` then ``+ dp(k_mlp, mlp(norm2 x))``."""
    cfg = dataclasses.replace(CFG, drop_path=0.5)
    params, x, k = init_block(cfg, random.key(0)), torch.randn(64, 5, 16), random.key(5)
    y = block(params, x, cfg=cfg, key=k, train=True)
    a = attention(params["attn"], layer_norm(params["norm1"], x), cfg=cfg.self_attention)
    h = x + random.drop_path(random.fold_in(k, "attn_out_path"), a, 0.5)
    m = mlp(params["mlp"], layer_norm(params["norm2"], h), act=cfg.act)
    m = random.drop_path(random.fold_in(k, "mlp_out_path"), m, 0.5)
    torch.testing.assert_close(y, h + m)
    # The two branches' masks differ: some examples keep one branch and skip the other.
    ones = torch.ones(64, 1)
    masks = [
        random.drop_path(random.fold_in(k, f"{n}_path"), ones, 0.5) for n in ("attn_out", "mlp_out")
    ]
    assert not torch.equal(masks[0], masks[1])
