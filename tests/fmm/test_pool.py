"""The attentional pooler: parity with open_clip's AttentionalPooler, shape and mask laws."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import vmap

from fmm import nn, random, tree
from tests.reference import reference


def _x(seed, *shape):
    return random.normal(random.key(seed), shape)


def _pool(dim=12, heads=3, queries=5, context_dim=7, seed=0):
    cfg = nn.AttentionPoolConfig(dim=dim, heads=heads, queries=queries, context_dim=context_dim)
    params = nn.init_attention_pool(cfg, random.key(seed))
    # Non-trivial norms and biases, so that a wrongly mapped one cannot pass by accident.
    params = tree.map(lambda t: t + 0.1 * random.normal(random.key(t.numel()), t.shape), params)
    return cfg, params


def _to_open_clip(params, cfg):
    """Our pooler's params under open_clip's AttentionalPooler names (a test-only key map)."""
    d, attn = cfg.dim, params["attn"]
    k, v = attn["kv"]["weight"][:d], attn["kv"]["weight"][d:]
    state = {
        "query": params["query"],
        "ln_q.weight": params["norm_query"]["weight"],
        "ln_q.bias": params["norm_query"]["bias"],
        "ln_k.weight": params["norm_context"]["weight"],
        "ln_k.bias": params["norm_context"]["bias"],
        "attn.in_proj_bias": torch.cat([attn["q"]["bias"], attn["kv"]["bias"]]),
        "attn.out_proj.weight": attn["out"]["weight"],
        "attn.out_proj.bias": attn["out"]["bias"],
    }
    if cfg.kv_dim == d:  # nn.MultiheadAttention packs q, k and v when all widths agree
        state["attn.in_proj_weight"] = torch.cat([attn["q"]["weight"], k, v])
    else:
        state["attn.q_proj_weight"] = attn["q"]["weight"]
        state["attn.k_proj_weight"], state["attn.v_proj_weight"] = k, v
    return state


@pytest.mark.parametrize("context_dim", [7, 12], ids=["context_7", "context_eq_dim"])
def test_attention_pool_matches_open_clips_attentional_pooler(context_dim):
    oc = reference("open_clip.transformer")
    cfg, params = _pool(context_dim=context_dim)
    ref = oc.AttentionalPooler(cfg.dim, context_dim, n_head=cfg.heads, n_queries=cfg.queries)
    ref.load_state_dict(_to_open_clip(params, cfg), strict=True)
    x = _x(1, 3, 9, context_dim)
    with torch.no_grad():
        want = ref(x)
    got = nn.attention_pool(params, x, cfg=cfg)
    assert got.shape == want.shape == (3, cfg.queries, cfg.dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@given(b=st.integers(1, 4), s=st.integers(1, 6), q=st.integers(1, 4), seed=st.integers(0, 50))
def test_attention_pool_shape_and_batch_independence(b, s, q, seed):
    cfg, params = _pool(queries=q, seed=seed)
    x = _x(seed + 1, b, s, 7)
    full = nn.attention_pool(params, x, cfg=cfg)
    assert full.shape == (b, q, 12)
    for i in range(b):
        torch.testing.assert_close(
            full[i : i + 1], nn.attention_pool(params, x[i : i + 1], cfg=cfg)
        )
    mapped = vmap(lambda xi: nn.attention_pool(params, xi[None], cfg=cfg)[0])(x)
    torch.testing.assert_close(mapped, full)


@given(s=st.integers(2, 7), pad=st.integers(1, 3), seed=st.integers(0, 50))
def test_attention_pool_ignores_order_and_masked_padding(s, pad, seed):
    cfg, params = _pool(seed=seed)
    x = _x(seed + 1, 2, s, 7)
    perm = torch.randperm(s, generator=torch.Generator().manual_seed(seed))
    alone = nn.attention_pool(params, x, cfg=cfg)
    torch.testing.assert_close(nn.attention_pool(params, x[:, perm], cfg=cfg), alone)
    padded = torch.cat([x, _x(seed + 2, 2, pad, 7) * 10], dim=1)
    valid = torch.arange(s + pad).expand(2, -1) < s
    torch.testing.assert_close(nn.attention_pool(params, padded, cfg=cfg, mask=valid), alone)


def test_attention_pool_refuses_bad_input_by_name():
    cfg, params = _pool()
    with pytest.raises(ValueError, match=r"^x must have shape \[batch, seq, 7\]"):
        nn.attention_pool(params, _x(0, 2, 3, 12), cfg=cfg)
    with pytest.raises(ValueError, match=r"^mask"):
        nn.attention_pool(params, _x(0, 2, 3, 7), cfg=cfg, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="queries"):
        nn.AttentionPoolConfig(dim=8, heads=2, queries=0)
    with pytest.raises(ValueError, match="heads"):
        nn.AttentionPoolConfig(dim=8, heads=3, queries=2)
