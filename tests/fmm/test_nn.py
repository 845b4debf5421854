"""Laws of the pure layers, with small odd sizes that catch transposed weights."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import jacrev, vmap

from fmm import nn, random, tree

dims = st.sampled_from([3, 5, 7])
heads_and_dims = st.sampled_from([(1, 3), (1, 5), (3, 9), (5, 15)])


def _x(seed, *shape):
    return random.normal(random.key(seed), shape)


def _perturbed(params):
    """Non-trivial norms and biases, so that a wrongly wired block cannot pass by accident."""
    return tree.map(lambda x: x + 0.1 * random.normal(random.key(x.numel()), x.shape), params)


@given(i=dims, o=dims, b=st.integers(1, 4))
def test_linear_matches_torch_layout(i, o, b):
    p = nn.init_linear(i, o, random.key(0))
    assert p["weight"].shape == (o, i) and p["bias"].shape == (o,)
    x = _x(1, b, i)
    torch.testing.assert_close(nn.linear(p, x), x @ p["weight"].T + p["bias"])


@given(d=dims)
def test_layer_norm_normalises(d):
    y = nn.layer_norm(nn.init_layer_norm(d), _x(2, 4, d) * 3 + 1)
    torch.testing.assert_close(y.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("act", sorted(nn.ACTIVATIONS))
def test_mlp_shape_for_every_activation(act):
    p = nn.init_mlp(5, 7, random.key(0), out_dim=3)
    assert nn.mlp(p, _x(1, 2, 4, 5), act=act).shape == (2, 4, 3)


def test_quick_gelu_is_close_to_gelu():
    x = torch.linspace(-3, 3, 61)
    assert (nn.quick_gelu(x) - torch.nn.functional.gelu(x)).abs().max() < 0.03


@given(hd=heads_and_dims, s=st.integers(1, 6), b=st.integers(1, 3))
def test_attention_batch_independence_and_vmap(hd, s, b):
    h, d = hd
    cfg = nn.AttentionConfig(dim=d, heads=h)
    p = nn.init_attention(cfg, random.key(0))
    x = _x(1, b, s, d)
    full = nn.attention(p, x, cfg=cfg)
    assert full.shape == (b, s, d)
    for i in range(b):
        torch.testing.assert_close(full[i : i + 1], nn.attention(p, x[i : i + 1], cfg=cfg))
    mapped = vmap(lambda xi: nn.attention(p, xi[None], cfg=cfg)[0])(x)
    torch.testing.assert_close(mapped, full)


@given(hd=heads_and_dims, s=st.integers(2, 7), seed=st.integers(0, 100))
def test_unmasked_self_attention_is_permutation_equivariant(hd, s, seed):
    h, d = hd
    cfg = nn.AttentionConfig(dim=d, heads=h)
    p = nn.init_attention(cfg, random.key(seed))
    x = _x(seed + 1, 2, s, d)
    perm = torch.randperm(s, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        nn.attention(p, x[:, perm], cfg=cfg), nn.attention(p, x, cfg=cfg)[:, perm]
    )


@given(s=st.integers(2, 6))
def test_causal_attention_never_looks_ahead(s):
    cfg = nn.AttentionConfig(dim=6, heads=2)
    p = nn.init_attention(cfg, random.key(0))
    jac = jacrev(lambda x: nn.attention(p, x, cfg=cfg, causal=True))(_x(1, 1, s, 6))
    # d out[0, i] / d x[0, j] is zero for every j > i
    influence = jac.abs().sum(dim=(0, 2, 3, 5))
    assert torch.all(influence.triu(1) == 0)
    assert torch.all(influence.diagonal() > 0)


def test_explicit_causal_mask_equals_is_causal():
    cfg = nn.AttentionConfig(dim=6, heads=3)
    p = nn.init_attention(cfg, random.key(0))
    x = _x(1, 2, 5, 6)
    mask = nn.causal_mask(5, 5)
    torch.testing.assert_close(
        nn.attention(p, x, cfg=cfg, mask=mask), nn.attention(p, x, cfg=cfg, causal=True)
    )


@given(pad=st.integers(1, 4))
def test_masked_padding_does_not_change_real_positions(pad):
    cfg = nn.AttentionConfig(dim=5, heads=1)
    p = nn.init_attention(cfg, random.key(0))
    x = _x(1, 1, 3, 5)
    padded = torch.cat([x, _x(2, 1, pad, 5) * 10], dim=1)
    valid = torch.arange(3 + pad)[None] < 3
    out = nn.attention(p, padded, cfg=cfg, mask=nn.padding_mask(valid))[:, :3]
    torch.testing.assert_close(out, nn.attention(p, x, cfg=cfg))


def test_cross_attention_shapes_and_context_mask():
    cfg = nn.AttentionConfig(dim=6, heads=2, kv_dim=5)
    p = nn.init_attention(cfg, random.key(0))
    assert p["q"]["weight"].shape == (6, 6) and p["kv"]["weight"].shape == (12, 5)
    ctx = _x(2, 2, 4, 5)
    y = nn.attention(p, _x(1, 2, 3, 6), cfg=cfg, context=ctx)
    assert y.shape == (2, 3, 6)
    with pytest.raises(ValueError, match="context"):
        nn.attention(p, _x(1, 2, 3, 6), cfg=cfg)


def test_transformer_with_cross_attention_and_dropout_identities():
    cfg = nn.TransformerConfig(
        width=6, layers=2, heads=2, cross_dim=5, dropout=0.3, attn_dropout=0.2
    )
    p = nn.init_transformer(cfg, random.key(0))
    x, ctx = _x(1, 2, 3, 6), _x(2, 2, 4, 5)
    eval_out = nn.transformer(p, x, cfg=cfg, context=ctx)
    k = random.key(9)
    train_a = nn.transformer(p, x, cfg=cfg, context=ctx, key=k, train=True)
    train_b = nn.transformer(p, x, cfg=cfg, context=ctx, key=k, train=True)
    assert torch.equal(train_a, train_b)
    assert not torch.allclose(train_a, eval_out)
    with pytest.raises(ValueError, match="key"):
        nn.transformer(p, x, cfg=cfg, context=ctx, train=True)


def test_init_is_a_pure_function_of_the_key():
    cfg = nn.TransformerConfig(width=6, layers=2, heads=3)
    a, b = nn.init_transformer(cfg, random.key(1)), nn.init_transformer(cfg, random.key(1))
    c = nn.init_transformer(cfg, random.key(2))
    wa, wb, wc = (t["blocks"][1]["attn"]["qkv"]["weight"] for t in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    # one block can be re-initialised alone from its folded key
    alone = nn.init_block(cfg, random.fold_in(random.key(1), 1))
    assert torch.equal(alone["mlp"]["fc1"]["weight"], a["blocks"][1]["mlp"]["fc1"]["weight"])


@given(s=st.integers(1, 6), seed=st.integers(0, 50))
def test_pooling_laws(s, seed):
    x = _x(seed, 2, s, 3)
    perm = torch.randperm(s, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(nn.pool_mean(x[:, perm]), nn.pool_mean(x))
    assert torch.equal(nn.pool_cls(x), x[:, 0])
    tokens = torch.zeros(2, s, dtype=torch.long)
    tokens[0, s - 1], tokens[1, 0] = 9, 9
    assert torch.equal(nn.pool_eot(x, tokens), torch.stack([x[0, s - 1], x[1, 0]]))
    mask = torch.ones(2, s, dtype=torch.bool)
    padded = torch.cat([x, _x(99, 2, 2, 3)], 1)
    torch.testing.assert_close(
        nn.pool_mean(padded, torch.cat([mask, torch.zeros(2, 2, dtype=torch.bool)], 1)),
        nn.pool_mean(x),
    )


def test_patch_embed_orders_patches_row_major():
    p = nn.init_patch_embed(2, 3, 5, random.key(0))
    img = _x(1, 1, 3, 4, 6)
    out = nn.patch_embed(p, img)
    assert out.shape == (1, 6, 5)
    second_row_first_col = img[:, :, 2:4, 0:2].reshape(1, -1) @ p["weight"].reshape(5, -1).T
    torch.testing.assert_close(out[:, 3], second_row_first_col + p["bias"])


def test_sincos_positions():
    pe = nn.sincos_2d(3, 4, 8)
    assert pe.shape == (12, 8)
    assert len({tuple(r.tolist()) for r in pe}) == 12  # every position distinct
    torch.testing.assert_close(
        nn.sincos_1d(torch.tensor([0]), 6)[0], torch.tensor([0.0] * 3 + [1.0] * 3)
    )
    with pytest.raises(ValueError, match="dim"):
        nn.sincos_2d(2, 2, 6)


def test_configs_refuse_bad_sizes():
    with pytest.raises(ValueError, match="heads"):
        nn.AttentionConfig(dim=5, heads=2)
    with pytest.raises(ValueError, match="activation"):
        nn.TransformerConfig(width=4, layers=1, heads=2, act="nope")


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_norm", "post_norm"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_cached_block_in_chunks_equals_the_causal_block(norm_first, cross):
    cfg = nn.TransformerConfig(
        width=6, layers=1, heads=3, norm_first=norm_first, cross_dim=5 if cross else None
    )
    p = _perturbed(nn.init_block(cfg, random.key(0)))
    x, ctx = _x(1, 2, 5, 6), (_x(2, 2, 4, 5) if cross else None)
    full = nn.block(p, x, cfg=cfg, causal=True, context=ctx)
    length = 7  # two slots never written
    cache = {"k": torch.zeros(2, 3, length, 2), "v": torch.zeros(2, 3, length, 2)}
    if cross:
        cache["ck"], cache["cv"] = torch.zeros(2, 3, 4, 2), torch.zeros(2, 3, 4, 2)
    outs = []
    for lo, hi in ((0, 2), (2, 3), (3, 5)):  # a prefill, then token by token
        slots = torch.arange(lo, hi).expand(2, -1)
        mask = nn.causal_mask(hi - lo, length, offset=lo)
        context = ctx if lo == 0 else None  # cross keys/values come from the cache after
        y, cache = nn.block(p, x[:, lo:hi], cfg=cfg, cache=cache, slots=slots, mask=mask,
                            context=context)  # fmt: skip
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-6, rtol=0)
    assert torch.equal(cache["k"][:, :, 5:], torch.zeros(2, 3, 2, 2))


def test_cached_attention_writes_in_place_only_when_donated_and_refuses_is_causal():
    cfg = nn.AttentionConfig(dim=6, heads=3)
    p = nn.init_attention(cfg, random.key(0))
    cache = {"k": torch.zeros(1, 3, 4, 2), "v": torch.zeros(1, 3, 4, 2)}
    slots, mask = torch.tensor([[1]]), nn.causal_mask(1, 4, offset=1)
    x = _x(1, 1, 1, 6)
    _, kept = nn.attention(p, x, cfg=cfg, cache=cache, slots=slots, mask=mask)
    assert not cache["k"].any() and kept["k"][:, :, 1].abs().sum() > 0
    _, donated = nn.attention(p, x, cfg=cfg, cache=cache, slots=slots, mask=mask, donate=True)
    assert donated["k"] is cache["k"] and torch.equal(donated["k"], kept["k"])
    with pytest.raises(ValueError, match="offset mask"):
        nn.attention(p, x, cfg=cfg, cache=cache, slots=slots, causal=True)
    with pytest.raises(ValueError, match="slots="):
        nn.attention(p, x, cfg=cfg, cache=cache, mask=mask)
