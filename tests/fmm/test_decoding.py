"""fmm.decoding: cached decoding equals the full causal forward; samplers; generate; errors.

The decoder here is built from fmm.nn alone (a spec over a bare transformer stack), so the
tests pin the generic contract rather than one model family.
"""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fmm
from fmm import decoding, nn

VOCAB, WIDTH, HEADS, LAYERS, CTX = 11, 24, 3, 2, 32  # odd sizes catch transposed layouts


def _embed(params, tokens, positions):
    return nn.embed(params["token"], tokens) + F.embedding(positions, params["pos"])


def _head(params, h):
    return nn.linear(params["out"], nn.layer_norm(params["norm"], h))


def _init(cfg: nn.TransformerConfig, key):
    p = {
        "token": nn.init_embedding(VOCAB, WIDTH, fmm.random.fold_in(key, "token"), std=1.0),
        "pos": nn.init_learned_positions(CTX, WIDTH, fmm.random.fold_in(key, "pos"), std=0.5),
        "transformer": nn.init_transformer(cfg, fmm.random.fold_in(key, "transformer")),
        "norm": nn.init_layer_norm(WIDTH),
        "out": nn.init_linear(WIDTH, VOCAB, fmm.random.fold_in(key, "out"), std=0.5),
    }
    # Non-trivial norms and biases, so a wrongly wired block cannot pass by accident.
    return fmm.tree.map(
        lambda x: x + 0.1 * fmm.random.normal(fmm.random.key(x.numel()), x.shape), p
    )


TRANSFORMER = nn.TransformerConfig(width=WIDTH, layers=LAYERS, heads=HEADS, act="gelu_tanh")
CROSS = nn.TransformerConfig(width=WIDTH, layers=LAYERS, heads=HEADS, cross_dim=7)
SPEC = decoding.DecoderSpec(transformer=TRANSFORMER, embed=_embed, head=_head, max_positions=CTX)
CROSS_SPEC = decoding.DecoderSpec(transformer=CROSS, embed=_embed, head=_head, max_positions=CTX)


@functools.cache
def _params(cross: bool = False):
    return _init(CROSS if cross else TRANSFORMER, fmm.random.key(3))


def _full_forward(params, tokens, *, cfg=TRANSFORMER, context=None):
    """One causal forward with no cache: the ground truth."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    x = _embed(params, tokens, positions)
    x = nn.transformer(params["transformer"], x, cfg=cfg, causal=True, context=context)
    return _head(params, x)


def _tokens(seed, batch, seq):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@given(
    seq=st.integers(1, 12),
    split=st.integers(1, 12),
    batch=st.integers(1, 3),
    extra=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_prefill_then_step_by_step_decode_equals_full_forward(seq, split, batch, extra, seed):
    split = min(split, seq)
    tokens = _tokens(seed, batch, seq)
    params = _params()
    full = _full_forward(params, tokens)
    cache = decoding.init_cache(SPEC, batch, seq + extra)
    logits, cache = decoding.prefill(params, tokens[:, :split], cache, cfg=SPEC)
    steps = [logits]
    for i in range(split, seq):
        step, cache = decoding.decode_step(params, tokens[:, i], cache, cfg=SPEC)
        steps.append(step[:, None])
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert cache["pos"].tolist() == [seq] * batch


@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    steps=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_left_padded_batch_equals_each_prompt_alone(lengths, steps, seed):
    params = _params()
    seq = max(lengths)
    rows = [_tokens(seed + i, 1, n + steps) for i, n in enumerate(lengths)]
    pad = 5  # any id: padding slots are masked out
    prompt = torch.stack([F.pad(r[0, :n], (seq - n, 0), value=pad) for r, n in zip(rows, lengths)])
    cache = decoding.init_cache(SPEC, len(lengths), seq + steps)
    logits, cache = decoding.prefill(params, prompt, cache, cfg=SPEC, lengths=torch.tensor(lengths))
    outs = [logits[:, -1]]
    for s in range(steps):
        nxt = torch.stack([r[0, n + s] for r, n in zip(rows, lengths)])
        step, cache = decoding.decode_step(params, nxt, cache, cfg=SPEC)
        outs.append(step)
    for b, (r, n) in enumerate(zip(rows, lengths)):
        alone = _full_forward(params, r[:, : n + steps])[0, n - 1 :]
        got = torch.stack([o[b] for o in outs])
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
        # The prompt's own logits too, at its real (right-aligned) slots.
        prompt_only = _full_forward(params, r[:, :n])[0]
        torch.testing.assert_close(logits[b, seq - n :], prompt_only, atol=1e-5, rtol=0)


def test_cross_attention_decode_equals_full_forward():
    params = _params(cross=True)
    tokens = _tokens(1, 2, 9)
    context = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    full = _full_forward(params, tokens, cfg=CROSS, context=context)
    cache = decoding.init_cache(CROSS_SPEC, 2, 9, context_len=5)
    logits, cache = decoding.prefill(params, tokens[:, :4], cache, cfg=CROSS_SPEC, context=context)
    steps = [logits]
    for i in range(4, 9):
        step, cache = decoding.decode_step(params, tokens[:, i], cache, cfg=CROSS_SPEC)
        steps.append(step[:, None])
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_post_norm_stack_decodes_step_by_step_equal_to_its_full_forward(cross):
    # BERT/ALBEF-style blocks (norm after each residual sum) through the same cached block.
    cfg = dataclasses.replace(CROSS if cross else TRANSFORMER, norm_first=False)
    spec = decoding.DecoderSpec(transformer=cfg, embed=_embed, head=_head, max_positions=CTX)
    params = _init(cfg, fmm.random.key(5))
    lengths = torch.tensor([3, 6, 4])
    rows = [_tokens(20 + b, 1, 10)[0] for b in range(3)]
    prompt = torch.stack([F.pad(r[:n], (6 - n, 0), value=1) for r, n in zip(rows, lengths)])
    context = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1)) if cross else None
    cache = decoding.init_cache(spec, 3, 10, context_len=5 if cross else None)
    logits, cache = decoding.prefill(
        params, prompt, cache, cfg=spec, lengths=lengths, context=context, donate=True
    )
    outs = [logits[:, -1]]
    for s in range(4):
        nxt = torch.stack([r[n + s] for r, n in zip(rows, lengths)])
        step, cache = decoding.decode_step(params, nxt, cache, cfg=spec, donate=True)
        outs.append(step)
    for b, (r, n) in enumerate(zip(rows, lengths)):
        ctx = None if context is None else context[b : b + 1]
        alone = _full_forward(params, r[None, : n + 4], cfg=cfg, context=ctx)[0, n - 1 :]
        torch.testing.assert_close(torch.stack([o[b] for o in outs]), alone, atol=1e-5, rtol=0)


def test_decode_step_leaves_the_callers_cache_untouched_unless_donated():
    params, tokens = _params(), _tokens(2, 2, 6)
    _, cache = decoding.prefill(params, tokens, decoding.init_cache(SPEC, 2, 8), cfg=SPEC)
    before = fmm.tree.map(torch.clone, cache)
    pure, new = decoding.decode_step(params, tokens[:, 0], cache, cfg=SPEC)
    for a, b in zip(fmm.tree.leaves(cache), fmm.tree.leaves(before)):
        assert torch.equal(a, b)
    donated, new2 = decoding.decode_step(params, tokens[:, 0], cache, cfg=SPEC, donate=True)
    torch.testing.assert_close(donated, pure, atol=0, rtol=0)
    assert new2["layers"][0]["k"] is cache["layers"][0]["k"]  # written in place
    assert torch.equal(new2["layers"][0]["k"], new["layers"][0]["k"])


def test_prefill_last_only_gives_the_last_positions_logits():
    params, tokens = _params(), _tokens(3, 2, 7)
    full, _ = decoding.prefill(params, tokens, decoding.init_cache(SPEC, 2, 7), cfg=SPEC)
    last, _ = decoding.prefill(
        params, tokens, decoding.init_cache(SPEC, 2, 7), cfg=SPEC, last_only=True
    )
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)


def test_generate_is_repeatable_for_a_key_and_varies_across_keys():
    params, prompt = _params(), _tokens(4, 3, 5)
    kw = dict(cfg=SPEC, max_new_tokens=12, temperature=1.0, top_k=6)
    a = decoding.generate(params, prompt, key=fmm.random.key(7), **kw)
    b = decoding.generate(params, prompt, key=fmm.random.key(7), **kw)
    c = decoding.generate(params, prompt, key=fmm.random.key(8), **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == (3, 12) and a.lengths.tolist() == [12] * 3


def test_greedy_generate_follows_the_argmax_of_the_full_forward():
    params, prompt = _params(), _tokens(5, 2, 4)
    out = decoding.generate(params, prompt, cfg=SPEC, max_new_tokens=8).tokens
    seq = prompt
    for i in range(8):
        nxt = _full_forward(params, seq)[:, -1].argmax(-1)
        assert torch.equal(out[:, i], nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)


def test_each_sequence_stops_at_its_own_eos():
    params, prompt = _params(), _tokens(6, 2, 4)
    free = decoding.generate(params, prompt, cfg=SPEC, max_new_tokens=10).tokens
    eos = int(free[0, 2])  # row 0 emits it at step 2; row 1 maybe later or never
    out = decoding.generate(params, prompt, cfg=SPEC, max_new_tokens=10, eos_id=eos, pad_id=-1)
    for b in range(2):
        hits = (free[b] == eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else 10
        assert out.lengths[b] == n
        assert torch.equal(out.tokens[b, :n], free[b, :n])
        assert (out.tokens[b, n:] == -1).all()


@given(
    k=st.integers(1, 12),
    temperature=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_top_k_never_samples_outside_the_k_largest(k, temperature, seed, ties):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, VOCAB, generator=g) * 3
    if ties:
        logits = logits.round()
    tok = decoding.sample(logits, fmm.random.key(seed), temperature=temperature, top_k=k)
    kth = logits.topk(min(k, VOCAB), -1).values[:, -1]
    assert (logits.gather(1, tok[:, None])[:, 0] >= kth).all()


@given(p=st.floats(0.01, 1.0), temperature=st.floats(0.05, 5.0), seed=st.integers(0, 2**16))
def test_top_p_never_samples_outside_the_nucleus(p, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, VOCAB, generator=g) * 3
    tok = decoding.sample(logits, fmm.random.key(seed), temperature=temperature, top_p=p)
    probs = (logits / temperature).softmax(-1)
    chosen = probs.gather(1, tok[:, None])
    # Tokens strictly more likely than the chosen one carry less than p between them.
    mass_above = (probs * (probs > chosen)).sum(-1)
    assert (mass_above < p + 1e-6).all()


def test_samplers_spread_over_the_allowed_set_and_greedy_is_temperature_zero():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]]).expand(4000, 5)
    tok = decoding.sample(logits, fmm.random.key(0), temperature=1.0, top_k=3)
    counts = torch.bincount(tok, minlength=5).float() / len(tok)
    expected = F.pad(logits[0, 1:4].softmax(-1), (1, 1))
    torch.testing.assert_close(counts, expected, atol=0.03, rtol=0)
    assert torch.equal(
        decoding.sample(logits, fmm.random.key(1), temperature=0.0), tok.new_full((4000,), 3)
    )


def test_bad_input_is_reported_clearly():
    params, prompt = _params(), _tokens(0, 2, 6)
    with pytest.raises(ValueError, match="max_len >= 9"):
        decoding.generate(params, prompt, cfg=SPEC, max_new_tokens=4, max_len=8)
    with pytest.raises(ValueError, match="max_len=4"):
        decoding.prefill(params, prompt, decoding.init_cache(SPEC, 2, 4), cfg=SPEC)
    with pytest.raises(ValueError, match="batch 2 but the cache was built for batch 3"):
        decoding.prefill(params, prompt, decoding.init_cache(SPEC, 3, 8), cfg=SPEC)
    with pytest.raises(ValueError, match="empty"):
        decoding.prefill(params, prompt[:, :0], decoding.init_cache(SPEC, 2, 8), cfg=SPEC)
    with pytest.raises(ValueError, match="empty"):
        decoding.generate(params, prompt[:, :0], cfg=SPEC, max_new_tokens=3)
    with pytest.raises(ValueError, match="needs key="):
        decoding.generate(params, prompt, cfg=SPEC, max_new_tokens=3, temperature=1.0)
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        decoding.init_cache(SPEC, 1, 33)
    with pytest.raises(ValueError, match=r"lengths.*\[1, 6\]"):
        decoding.prefill(
            params, prompt, decoding.init_cache(SPEC, 2, 8), cfg=SPEC, lengths=torch.tensor([0, 6])
        )
    _, full = decoding.prefill(params, prompt, decoding.init_cache(SPEC, 2, 6), cfg=SPEC)
    with pytest.raises(ValueError, match="cache is full"):
        decoding.decode_step(params, prompt[:, 0], full, cfg=SPEC)
    with pytest.raises(ValueError, match="needs context="):
        decoding.prefill(
            _params(cross=True), prompt, decoding.init_cache(CROSS_SPEC, 2, 8, context_len=3),
            cfg=CROSS_SPEC,
        )  # fmt: skip
    with pytest.raises(ValueError, match="top_p"):
        decoding.sample(prompt.float(), fmm.random.key(0), top_p=1.5)
    with pytest.raises(TypeError, match="DecoderSpec"):
        decoding.init_cache(TRANSFORMER, 1, 4)


@pytest.fixture(scope="module")
def compiled_runs():
    """One inductor compile of the decode step, then a second call with the same shapes
    (another prompt, another key) that must reuse it."""
    params = _params()
    kw = dict(cfg=SPEC, max_new_tokens=6, temperature=0.9, top_p=0.8, compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    first = decoding.generate(params, _tokens(0, 2, 5), key=fmm.random.key(0), **kw)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = decoding.generate(params, _tokens(1, 2, 5), key=fmm.random.key(1), **kw)
    return params, kw, first, second, graphs, torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_decode_compiles_once_and_never_recompiles(compiled_runs):
    *_, graphs_after_first, graphs_after_second = compiled_runs
    assert graphs_after_first == 1
    assert graphs_after_second == graphs_after_first


def test_compiled_generate_matches_eager(compiled_runs):
    params, kw, _, second, *_ = compiled_runs
    eager = decoding.generate(
        params, _tokens(1, 2, 5), key=fmm.random.key(1), **{**kw, "compile": False}
    )
    assert torch.equal(second.tokens, eager.tokens)
