"""fmm.batching: a slot's results do not depend on the other slots; chunked slot prefill and
the masked pool step equal batch-1 decoding; per-row sampling equals fmm.sampling.sample;
the compiled step compiles once whatever the occupancy."""

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import fmm
from fmm import batching, decoding, probes
from fmm.invariance import PackedLinears, packed_available
from fmm.sampling import sample
from models import gpt

CFG = gpt.GPTConfig(vocab_size=97, context_length=40, width=32, layers=2, heads=4)
SPEC = gpt.decoder_spec(CFG)
PARAMS = gpt.init(CFG, fmm.random.key(0))


def test_a_fixed_shape_matmul_computes_each_row_alone():
    # The law batch invariance rests on: at a fixed batch size, row i of a matmul does not
    # depend on the other rows or on which row it is (at batch 1 vs 8 it may: not used).
    torch.manual_seed(0)
    w, x = torch.randn(300, 96), torch.randn(96)
    rows = []
    for slot in (0, 3, 7):
        batch = torch.randn(8, 96)
        batch[slot] = x
        rows.append(F.linear(batch, w)[slot])
    assert all(torch.equal(rows[0], r) for r in rows)


def _alone(prompt, tokens):
    """Batch-1 logits after the prompt and after each fed token (fmm.decoding alone)."""
    cache = decoding.init_cache(SPEC, 1, len(prompt) + len(tokens))
    logits, cache = decoding.prefill(PARAMS, torch.tensor([prompt]), cache, cfg=SPEC)
    out = [logits[0, -1]]
    for t in tokens:
        step, cache = decoding.decode_step(PARAMS, torch.tensor([t]), cache, cfg=SPEC)
        out.append(step[0])
    return torch.stack(out)


def _in_pool(prompt, tokens, slot, neighbours, chunk):
    """The same through a 4-slot pool, ``neighbours`` (slot -> prompt) sharing every step."""
    pool = decoding.init_cache(SPEC, 4, CFG.context_length)
    feed = torch.zeros(4, dtype=torch.int64)
    for s, p in neighbours.items():
        batching.prefill_slot(PARAMS, torch.tensor(p), pool, s, cfg=SPEC)
        feed[s] = p[-1]
    for i in range(0, len(prompt), chunk):
        last = batching.prefill_slot(PARAMS, torch.tensor(prompt[i : i + chunk]), pool, slot,
                                     cfg=SPEC)  # fmt: skip
    active = torch.zeros(4, dtype=torch.bool)
    active[[slot, *neighbours]] = True
    out = [last]
    for t in tokens:
        feed[slot] = t
        logits, pool = batching.decode_slots(PARAMS, feed, pool, active, cfg=SPEC)
        out.append(logits[slot])
    return torch.stack(out), pool


def test_a_slot_equals_decoding_alone_and_ignores_its_neighbours():
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 97, (11,), generator=g).tolist()
    tokens = torch.randint(0, 97, (6,), generator=g).tolist()
    alone = _alone(prompt, tokens)
    a, pool = _in_pool(prompt, tokens, slot=1, neighbours={}, chunk=4)
    b, _ = _in_pool(prompt, tokens, slot=1, neighbours={0: [5, 6, 7], 3: [9] * 20}, chunk=4)
    c, _ = _in_pool(prompt, tokens, slot=2, neighbours={0: [1], 1: [2, 3]}, chunk=4)
    torch.testing.assert_close(a, alone, atol=1e-5, rtol=0)
    assert torch.equal(a, b) and torch.equal(a, c)  # whatever shares the pool, bit for bit
    # Idle rows kept their (zero) position; the active row advanced by one per token.
    assert pool["pos"].tolist() == [0, len(prompt) + len(tokens), 0, 0]


def test_prefill_chunks_equal_one_prefill():
    prompt = torch.randint(0, 97, (13,), generator=torch.Generator().manual_seed(2))
    whole = decoding.init_cache(SPEC, 2, CFG.context_length)
    one = batching.prefill_slot(PARAMS, prompt, whole, 0, cfg=SPEC)
    pool = decoding.init_cache(SPEC, 2, CFG.context_length)
    for i in range(0, 13, 5):
        last = batching.prefill_slot(PARAMS, prompt[i : i + 5], pool, 0, cfg=SPEC)
    torch.testing.assert_close(last, one, atol=1e-5, rtol=0)
    batching.free_slot(pool, 0)
    assert pool["pos"][0] == 0 and pool["start"][0] == 0


def test_sample_slots_draws_what_sample_draws_for_each_row():
    torch.manual_seed(3)
    logits = torch.randn(6, 97) * 3
    keys = fmm.random.split(fmm.random.key(4), 6)
    opts = [(0.0, 0, 0.0), (0.8, 0, 0.0), (1.3, 5, 0.0), (0.7, 0, 0.9), (1.0, 3, 0.5),
            (0.0, 2, 0.3)]  # fmt: skip
    t, k, p = (torch.tensor(col) for col in zip(*opts))
    got = batching.sample_slots(
        logits, batching.slot_noise(keys, 97), temperature=t.float(), top_k=k, top_p=p.float()
    )
    want = [
        int(sample(logits[i : i + 1], keys[i], temperature=ti, top_k=ki or None,
                   top_p=pi or None)[0])
        for i, (ti, ki, pi) in enumerate(opts)
    ]  # fmt: skip
    assert got.tolist() == want
    assert torch.equal(batching.sample_slots(logits, None, temperature=t * 0, top_k=k,
                                             top_p=p), logits.argmax(-1))  # fmt: skip


def test_the_compiled_step_compiles_once_whatever_the_occupancy():
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = batching.compiled_decode(counter)
    pool = decoding.init_cache(SPEC, 4, CFG.context_length)
    batching.prefill_slot(PARAMS, torch.tensor([1, 2, 3]), pool, 0, cfg=SPEC)
    eager_pool = fmm.tree.map(torch.clone, pool)
    feed = torch.tensor([4, 0, 0, 0])
    for occupied in ([0], [0, 2], [0, 1, 2, 3], [3]):
        active = torch.zeros(4, dtype=torch.bool)
        active[occupied] = True
        for s in occupied:
            if pool["pos"][s] == 0:
                for cache in (pool, eager_pool):
                    batching.prefill_slot(PARAMS, torch.tensor([s + 5]), cache, s, cfg=SPEC)
        got, pool = step(PARAMS, feed, pool, active, SPEC)
        want, eager_pool = batching.decode_slots(PARAMS, feed, eager_pool, active, cfg=SPEC)
        torch.testing.assert_close(got[active], want[active], atol=1e-5, rtol=0)
    assert counter.frame_count == 1


def test_the_math_attention_step_matches_the_sdpa_step_for_every_block():
    from models import coca  # a stack of two kinds of block (a tuple of configs)

    coca_spec = batching.with_attention(coca.decoder_spec(coca.coca_tiny()), "math")
    assert {c.attn_impl for c in coca_spec.transformer} == {"math"}
    math = batching.with_attention(SPEC, "math")
    assert math.transformer.attn_impl == "math" and SPEC.transformer.attn_impl == "sdpa"
    pools = [decoding.init_cache(SPEC, 3, CFG.context_length) for _ in range(2)]
    for s, prompt in enumerate(([1, 2, 3], [4], [5, 6, 7, 8, 9])):
        for pool in pools:
            batching.prefill_slot(PARAMS, torch.tensor(prompt), pool, s, cfg=SPEC)
    feed, active = torch.tensor([10, 11, 12]), torch.tensor([True, False, True])
    for _ in range(3):
        want, pools[0] = batching.decode_slots(PARAMS, feed, pools[0], active, cfg=SPEC)
        got, pools[1] = batching.decode_slots(PARAMS, feed, pools[1], active, cfg=math)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="impl must be 'sdpa' or 'math', got 'flash'"):
        batching.with_attention(SPEC, "flash")


def test_bad_arguments_are_refused_in_one_line():
    pool = decoding.init_cache(SPEC, 2, CFG.context_length)
    with pytest.raises(ValueError, match="slot must be in"):
        batching.prefill_slot(PARAMS, torch.tensor([1]), pool, 2, cfg=SPEC)
    with pytest.raises(ValueError, match="active"):
        batching.decode_slots(PARAMS, torch.tensor([1, 2]), pool, torch.ones(3).bool(), cfg=SPEC)


def test_prompts_prefilled_together_in_any_slots_equal_each_alone_where_the_probe_allows():
    pool = decoding.init_cache(SPEC, 8, CFG.context_length)
    allowed = probes.invariant_prefill(PARAMS, pool, [2, 4, 8], 16, cfg=SPEC)
    assert set(allowed) == {2, 4, 8} and all(n[0] == 1 for n in allowed.values())
    assert int(pool["pos"].abs().sum() + pool["start"].abs().sum()) == 0  # left empty
    ids = torch.randint(0, 97, (4, 8), generator=torch.Generator().manual_seed(5))
    alone = []
    for i in range(4):
        alone.append(batching.prefill_slots(PARAMS, ids[i : i + 1], pool, [i], cfg=SPEC,
                                            lengths=[8 - i], last_only=False))  # fmt: skip
    scattered = decoding.init_cache(SPEC, 8, CFG.context_length)
    got = batching.prefill_slots(PARAMS, ids, scattered, [6, 1, 3, 0], cfg=SPEC,
                                 lengths=[8, 7, 6, 5], last_only=False)  # fmt: skip
    torch.testing.assert_close(got, torch.cat(alone), atol=1e-5, rtol=0)
    for src, dst in ((6, 0), (1, 1), (3, 2), (0, 3)):  # each row where it was written
        for name in ("pos", "start"):
            assert scattered[name][src] == pool[name][dst]
        k, want = scattered["layers"][1]["k"][src, :, :8], pool["layers"][1]["k"][dst, :, :8]
        torch.testing.assert_close(k, want, atol=1e-5, rtol=0)
        assert torch.equal(k, want) or 4 not in allowed[8]  # bit for bit where probed exact
    assert torch.equal(got, torch.cat(alone)) or 4 not in allowed[8]


def test_a_moved_sequence_continues_bit_for_bit_and_the_probe_keeps_exact_buckets():
    pool = decoding.init_cache(SPEC, 4, CFG.context_length)
    buckets, reasons = probes.invariant_buckets(
        batching.compiled_decode(None), PARAMS, pool, batching.bucket_sizes(4), cfg=SPEC
    )
    assert buckets == [4 >> i for i in range(len(buckets))][::-1]  # the largest ones
    assert len(reasons) == (len(buckets) < 3)
    assert (
        batching.bucket_sizes(24) == [1, 2, 4, 8, 16, 24] and batching.bucket_for(3, buckets) >= 3
    )
    batching.prefill_slot(PARAMS, torch.tensor([3, 1, 4, 1]), pool, 3, cfg=SPEC)
    moved = fmm.tree.map(torch.clone, pool)
    batching.move_slot(moved, 3, 0)
    assert moved["pos"].tolist() == [4, 0, 0, 0]
    feed, active = torch.tensor([5, 0, 0, 5]), torch.tensor([True, False, False, True])
    a, _ = batching.decode_slots(PARAMS, feed, pool, active & torch.tensor([0, 0, 0, 1]).bool(),
                                 cfg=SPEC)  # fmt: skip
    b, _ = batching.decode_slots(PARAMS, feed, moved, active & torch.tensor([1, 0, 0, 0]).bool(),
                                 cfg=SPEC)  # fmt: skip
    assert torch.equal(a[3], b[0])


@pytest.mark.skipif(not packed_available(), reason="this torch has no oneDNN")
def test_a_lone_row_of_the_compiled_packed_step_rounds_as_in_a_batch():
    # GPT-2 small's widths, one layer: where inductor's layer norm and oneDNN's 3072-long
    # product would sum a single row otherwise than a row of a batch.
    cfg = gpt.GPTConfig(vocab_size=97, context_length=32, width=768, layers=1, heads=12)
    params, spec = gpt.init(cfg, fmm.random.key(1)), gpt.decoder_spec(cfg)
    step = batching.compiled_decode("inductor", linears="packed")
    with torch.inference_mode():
        pool = decoding.init_cache(spec, 2, cfg.context_length)
        with PackedLinears():
            for s in range(2):
                batching.prefill_slot(params, torch.arange(5) + 7 * s, pool, s, cfg=spec)
        out = {}
        for n in (1, 2):
            rows = batching.rows(fmm.tree.map(torch.clone, pool), n)
            logits, _ = step(params, torch.full((n,), 3), rows, torch.ones(n, dtype=torch.bool),
                             spec)  # fmt: skip
            out[n] = logits[0]
    assert torch.equal(out[1], out[2])
