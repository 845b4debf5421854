"""train.serve.scheduler: requests of mixed lengths arriving at random times each get what
they get alone (through the same scheduler: bit for bit; against fmm.decoding.generate:
logits within 1e-5 every step, the same tokens), for GPT text and mmgpt image codes (with
classifier-free guidance as two rows of the pool); EOS, stop ids, cancel, overload; one
compiled step for every occupancy."""

import asyncio
import random as pyrandom
import threading
import time

import pytest
import torch
import torch._dynamo.testing

import fmm
from fmm import batching, decoding
from models import gpt, mmgpt
from train.serve.engine import EngineClosed, Overloaded
from train.serve.scheduler import Scheduler

CFG = gpt.GPTConfig(vocab_size=97, context_length=48, width=32, layers=2, heads=4)
SPEC = gpt.decoder_spec(CFG)
PARAMS = gpt.init(CFG, fmm.random.key(0))
MM = mmgpt.MMGPTConfig(text_vocab=16, text_len=6, image_vocab=24, image_len=10, width=32,
                       layers=2, heads=2)  # fmt: skip
MM_PARAMS = mmgpt.init(MM, fmm.random.key(1))
OPTIONS = [{}, {"temperature": 0.9}, {"temperature": 1.2, "top_k": 7},
           {"temperature": 0.8, "top_p": 0.85}, {"temperature": 1.0, "top_k": 20, "top_p": 0.6}]  # fmt: skip


def _requests(n, seed):
    g = pyrandom.Random(seed)
    out = []
    for i in range(n):
        length = g.choice([1, 3, 9, 17, 30])
        prompt = [g.randrange(97) for _ in range(length)]
        out.append((prompt, g.randint(1, 48 - length + 1 if length > 1 else 20),
                    {**OPTIONS[i % len(OPTIONS)], "seed": i}))  # fmt: skip
    return out


def _alone_logits(prompt, tokens):
    """Batch-1 logits before each token (what fmm.decoding.generate computes alone)."""
    cache = decoding.init_cache(SPEC, 1, len(prompt) + len(tokens))
    logits, cache = decoding.prefill(PARAMS, torch.tensor([prompt]), cache, cfg=SPEC)
    out = [logits[0, -1]]
    for t in tokens[:-1]:
        step, cache = decoding.decode_step(PARAMS, torch.tensor([t]), cache, cfg=SPEC)
        out.append(step[0])
    return torch.stack(out)


def _submit_at_random_times(scheduler, requests, seed):
    g = pyrandom.Random(seed)
    handles = []
    for prompt, new, opts in requests:
        time.sleep(g.choice([0, 0, 0.001, 0.01]))
        handles.append(scheduler.submit(prompt, max_new_tokens=new, keep_logits=True, **opts))
    return handles


def test_each_request_gets_what_it_gets_alone_whatever_shares_the_pool():
    requests = _requests(14, seed=0)
    busy = Scheduler(PARAMS, SPEC, max_slots=4, prefill_chunk=8, compile=None)
    handles = _submit_at_random_times(busy, requests, seed=1)
    got = [h.result(timeout=60) for h in handles]
    assert busy.steps < sum(len(t) for t in got)  # they really shared steps
    busy.close()
    quiet = Scheduler(PARAMS, SPEC, max_slots=4, prefill_chunk=8, compile=None)
    compared = 0
    for (prompt, new, opts), h, tokens in zip(requests, handles, got):
        alone = quiet.submit(prompt, max_new_tokens=new, keep_logits=True, **opts)
        assert alone.result(timeout=60) == tokens  # the same server, alone: bit for bit
        assert len(h.logits) == len(alone.logits) == new
        assert all(torch.equal(a, b) for a, b in zip(alone.logits, h.logits))
        ref = decoding.generate(
            PARAMS, torch.tensor([prompt]), cfg=SPEC, max_new_tokens=new,
            key=fmm.random.key(opts["seed"]), temperature=opts.get("temperature", 0.0),
            top_k=opts.get("top_k"), top_p=opts.get("top_p"),
        )  # fmt: skip
        want = _alone_logits(prompt, tokens)
        torch.testing.assert_close(torch.stack(h.logits), want, atol=1e-5, rtol=0)
        top2 = want.topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1] > 1e-5).all()
        if decided or opts.get("temperature"):
            assert tokens == ref.tokens[0].tolist()
            compared += 1
        assert h.stop_reason == "length" and len(tokens) == new
    assert compared >= 12
    quiet.close()


def _image_codes(prompt, guidance, seed, temperature):
    null = torch.zeros(1, MM.text_len, dtype=torch.int64)
    return mmgpt.generate_images(
        MM_PARAMS, torch.tensor([prompt]), cfg=MM, key=fmm.random.key(seed),
        temperature=temperature, top_k=9, guidance=guidance, null_text=null,
    )[0].tolist()  # fmt: skip


def test_image_codes_with_and_without_guidance_equal_generate_images():
    spec = mmgpt.image_decoder_spec(MM)
    scheduler = Scheduler(MM_PARAMS, spec, max_slots=5, prefill_chunk=4, compile=None,
                          guided_from=MM.text_vocab)  # fmt: skip
    g = pyrandom.Random(2)
    jobs = []
    for i in range(6):
        prompt = [g.randrange(MM.text_vocab) for _ in range(MM.text_len)]
        guidance, temperature = (1.0, 3.0)[i % 2], (0.0, 1.0)[i // 2 % 2]
        h = scheduler.submit(prompt, max_new_tokens=MM.image_len, temperature=temperature,
                             top_k=9, seed=i, guidance=guidance, null_ids=[0] * MM.text_len)  # fmt: skip
        jobs.append((h, prompt, guidance, i, temperature))
        time.sleep(g.choice([0, 0.005]))
    for h, prompt, guidance, seed, temperature in jobs:
        codes = [t - MM.text_vocab for t in h.result(timeout=60)]
        assert codes == _image_codes(prompt, guidance, seed, temperature)
    scheduler.close()


def test_eos_stop_and_cancel_end_a_request_and_free_its_slot():
    probe = Scheduler(PARAMS, SPEC, max_slots=2, compile=None)
    tokens = probe.submit([1, 2, 3], max_new_tokens=10).result(timeout=30)
    probe.close()
    eos = Scheduler(PARAMS, SPEC, max_slots=2, compile=None, eos_id=tokens[3])
    h = eos.submit([1, 2, 3], max_new_tokens=10)
    assert h.result(timeout=30) == tokens[: tokens.index(tokens[3])]
    assert h.stop_reason == "eos"
    h = eos.submit([1, 2, 3], max_new_tokens=10, stop=[tokens[1]])
    assert h.result(timeout=30) == tokens[: tokens.index(tokens[1])] and h.stop_reason == "stop"
    long = eos.submit([1], max_new_tokens=40, temperature=1.0)
    first = next(long.stream(timeout=30))
    long.cancel()
    rest = list(long.stream(timeout=30))
    assert long.stop_reason == "cancelled" and 1 + len(rest) < 40 and first == long.tokens[0]
    assert eos.load == {"waiting": 0, "running": 0, "free_slots": 2}
    eos.close()


def test_async_iteration_and_refusals():
    scheduler = Scheduler(PARAMS, SPEC, max_slots=1, compile=None, max_waiting=1)

    async def main():
        h = scheduler.submit([4, 5], max_new_tokens=6)
        return [t async for t in h], h

    tokens, h = asyncio.run(main())
    assert tokens == h.tokens and len(tokens) == 6
    for bad, match in (({"max_new_tokens": 0}, "max_new_tokens"),
                       ({"max_new_tokens": 48}, "positions"),
                       ({"max_new_tokens": 2, "temperature": -1}, "temperature"),
                       ({"max_new_tokens": 2, "guidance": 2.0}, "null_ids")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            scheduler.submit([1, 2], **bad)
    with pytest.raises(ValueError, match="prompt_ids"):
        scheduler.submit([], max_new_tokens=2)
    with pytest.raises(ValueError, match="linears"):
        Scheduler(PARAMS, SPEC, max_slots=1, compile=None, linears="diagonal")
    blocker = scheduler.submit([1], max_new_tokens=40)
    next(blocker.stream(timeout=30))  # it holds the only slot now
    scheduler.submit([1], max_new_tokens=2)
    with pytest.raises(Overloaded):  # one slot running, one request waiting: full
        scheduler.submit([1], max_new_tokens=2)
    blocker.cancel()
    scheduler.close()


def test_occupancy_changes_compile_nothing_beyond_one_graph_per_bucket():
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    scheduler = Scheduler(PARAMS, SPEC, max_slots=4, prefill_chunk=5, compile=counter)
    scheduler.warmup()  # in this thread; the steps then run in the scheduler's
    # The step at each size probed (down to the first inexact one), the sampling noise at
    # each bucket kept.
    kept = len(scheduler.slots.buckets)
    tried = kept + (kept < len(batching.bucket_sizes(4)))
    assert counter.frame_count == tried + kept
    compiled = counter.frame_count
    handles = _submit_at_random_times(scheduler, _requests(6, seed=3), seed=4)
    for h in handles:
        h.result(timeout=120)
    assert scheduler.steps > 10 and set(scheduler.slots.bucket_steps) <= set(
        scheduler.slots.buckets
    )
    assert counter.frame_count == compiled  # none after start-up, whatever the occupancy
    scheduler.close()


def test_steps_attend_over_the_window_that_holds_the_live_rows_and_change_no_token():
    cfg = gpt.GPTConfig(vocab_size=97, context_length=160, width=32, layers=2, heads=4)
    spec, params = gpt.decoder_spec(cfg), gpt.init(cfg, fmm.random.key(2))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    windowed = Scheduler(params, spec, max_slots=4, prefill_chunk=16, compile=counter)
    windowed.warmup()
    assert windowed.slots.windows == [64, 128, 160]
    kept = len(windowed.slots.buckets)  # one graph a bucket serves every window
    assert counter.frame_count == 2 * kept + (kept < len(batching.bucket_sizes(4)))
    compiled = counter.frame_count
    g = pyrandom.Random(11)
    shapes = [(3, 20), (40, 60), (70, 85), (70, 20), (3, 85), (40, 60)]  # up to 155 of 160
    requests = [([g.randrange(97) for _ in range(p)], n) for p, n in shapes]
    handles = [windowed.submit(p, max_new_tokens=n, keep_logits=True, temperature=0.9, seed=i)
               for i, (p, n) in enumerate(requests)]  # fmt: skip
    for h in handles:
        h.result(timeout=120)
    assert set(windowed.slots.window_steps) == {64, 128, 160}  # each window served steps
    assert counter.frame_count == compiled  # none after start-up, whatever the lengths
    whole = Scheduler(params, spec, max_slots=4, prefill_chunk=16, compile=None,
                      follow_length=False)  # fmt: skip
    for (prompt, new), h in zip(requests, handles):
        alone = whole.submit(prompt, max_new_tokens=new, keep_logits=True, temperature=0.9,
                             seed=handles.index(h))  # fmt: skip
        assert alone.result(timeout=120) == h.tokens
        assert all(torch.equal(a, b) for a, b in zip(alone.logits, h.logits))
    assert set(whole.slots.window_steps) == {160}
    windowed.close()
    whole.close()


@pytest.mark.parametrize("linears", ["packed", "columns", "rows"])
def test_a_lone_request_in_its_small_bucket_equals_itself_in_a_full_pool(linears):
    g = pyrandom.Random(7)
    request = ([g.randrange(97) for _ in range(5)], {"temperature": 0.9, "seed": 3})
    others = [([g.randrange(97) for _ in range(g.choice([2, 9]))], {"seed": i}) for i in range(15)]
    bucketed = Scheduler(PARAMS, SPEC, max_slots=16, prefill_chunk=8, compile=None,
                         linears=linears)  # fmt: skip
    lone = bucketed.submit(request[0], max_new_tokens=12, keep_logits=True, **request[1])
    lone.result(timeout=60)
    assert set(bucketed.slots.bucket_steps) == {
        bucketed.slots.buckets[0]
    }  # the smallest bucket kept
    full = Scheduler(PARAMS, SPEC, max_slots=16, prefill_chunk=8, compile=None,
                     follow_occupancy=False, linears=linears)  # fmt: skip
    crowd = [full.submit(p, max_new_tokens=20, **o) for p, o in others[:8]]
    again = full.submit(request[0], max_new_tokens=12, keep_logits=True, **request[1])
    crowd += [full.submit(p, max_new_tokens=20, **o) for p, o in others[8:]]
    assert again.result(timeout=60) == lone.tokens
    assert all(torch.equal(a, b) for a, b in zip(again.logits, lone.logits))
    assert set(full.slots.bucket_steps) == {16}
    for h in crowd:
        h.result(timeout=60)
    bucketed.close()
    full.close()


def test_the_start_up_probe_keeps_the_whole_pool_for_a_step_that_rounds_by_batch(caplog):
    scheduler = Scheduler(PARAMS, SPEC, max_slots=4, compile=None)
    real = scheduler.slots.decode

    def skewed(params, tokens, cache, active, spec):  # rounds otherwise below 4 rows
        logits, cache = real(params, tokens, cache, active, spec)
        return logits + 1e-6 * (tokens.shape[0] < 4), cache

    scheduler.slots.decode = skewed
    with caplog.at_level("WARNING"):
        scheduler.warmup()
    assert scheduler.slots.buckets == [4] and "2 rows: logits differ" in caplog.text
    assert len(scheduler.submit([1, 2, 3], max_new_tokens=5).result(timeout=30)) == 5
    assert set(scheduler.slots.bucket_steps) == {4}
    scheduler.close()


def test_waiting_prompts_are_prefilled_together_where_the_probe_allows():
    scheduler = Scheduler(PARAMS, SPEC, max_slots=8, prefill_chunk=16, compile=None)
    scheduler.warmup()
    calls = []
    real = batching.prefill_slots

    def counted(params, tokens, *args, **kw):
        calls.append(tuple(tokens.shape))
        return real(params, tokens, *args, **kw)

    batching.prefill_slots = counted
    try:
        g = pyrandom.Random(8)
        prompts = [[g.randrange(97) for _ in range(g.choice([5, 7, 8]))] for _ in range(6)]
        handles = [scheduler.submit(p, max_new_tokens=4, keep_logits=True) for p in prompts]
        got = [h.result(timeout=60) for h in handles]
    finally:
        batching.prefill_slots = real
    if 8 in scheduler.slots.batched_prefill:  # prompts of 5-8 tokens: padded to 8 and batched
        assert any(rows > 1 for rows, _ in calls)
    for p, h, tokens in zip(prompts, handles, got):
        torch.testing.assert_close(torch.stack(h.logits), _alone_logits(p, tokens), atol=1e-5,
                                   rtol=0)  # fmt: skip
    scheduler.close()


def test_the_serve_command_batches_generations_by_default(tmp_path):
    import argparse

    from tests.serve.test_gpt_serving import write_gpt2_dir
    from train.recipes import serve

    write_gpt2_dir(tmp_path)
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    defaults = parser.parse_args(["--ckpt", str(tmp_path)])
    assert not defaults.no_batching and defaults.compile_step == "inductor"

    def events(*flags):
        args = parser.parse_args(["--ckpt", str(tmp_path), *flags])
        service = serve.build_service(args)

        async def one(i):
            opts = {"temperature": 0.9 if i % 2 else 0.0, "seed": i, "max_new_tokens": 5 + i}
            return [e async for e in service.generate(f"a red {i}", **opts)]

        async def main():
            return await asyncio.gather(*(one(i) for i in range(6))), service.max_generations

        return asyncio.run(main())

    batched, cap = events("--compile-step", "none", "--max-slots", "3", "--prefill-chunk", "2")
    alone, cap_alone = events("--no-batching", "--max-generations", "6")
    assert batched == alone and (cap, cap_alone) == (12, 6)
    # int8 activations share one quantization range per batch: those run alone.
    int8 = serve.build_service(parser.parse_args(["--ckpt", str(tmp_path), "--quantize", "int8"]))
    assert int8.max_generations == 2


def test_served_image_codes_are_the_same_batched_or_alone(tmp_path):
    from tests.serve._runs import tiny_mmgpt_run
    from train.recipes import serve
    from train.serve import Service

    run_dir = tiny_mmgpt_run(tmp_path / "mmgpt")
    batching = serve.Batching(max_slots=3, prefill_chunk=4, compile=None)

    def events(model):
        service = Service(model, max_generations=8)
        jobs = [("a blue star", 1.0, 0.0), ("a red circle", 2.0, 1.0), ("a blue star", 3.0, 0.0),
                ("a green square", 1.0, 1.0)]  # fmt: skip

        async def main():
            return await asyncio.gather(*(
                _collect(service.generate(p, guidance=g, temperature=t, top_k=5, seed=i))
                for i, (p, g, t) in enumerate(jobs)
            ))  # fmt: skip

        return asyncio.run(main())

    batched = events(serve.load_model(run_dir, batching=batching))
    assert batched == events(serve.load_model(run_dir))
    assert all(e[-1]["done"] and len(e) == len(e[-1]["tokens"]) + 1 for e in batched)


async def _collect(events):
    return [e async for e in events]


def test_a_model_failure_ends_its_requests_and_the_scheduler_serves_on(monkeypatch):

    scheduler = Scheduler(PARAMS, SPEC, max_slots=2, compile=None)
    scheduler.warmup()  # the probe prefills too
    real, calls = batching.prefill_slots, []

    def failing_once(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(*args, **kw)

    monkeypatch.setattr(batching, "prefill_slots", failing_once)
    with pytest.raises(RuntimeError, match="out of memory"):
        scheduler.submit([1, 2], max_new_tokens=3).result(timeout=30)
    assert len(scheduler.submit([1, 2], max_new_tokens=3).result(timeout=30)) == 3
    assert scheduler.load["free_slots"] == 2
    scheduler.close()
    with pytest.raises(EngineClosed):
        scheduler.submit([1], max_new_tokens=1)


@pytest.mark.slow
def test_inductor_compiled_requests_are_the_same_alone_and_in_company():
    # What `python -m train serve` runs by default: the step compiled by inductor.
    requests = _requests(8, seed=5)
    busy = Scheduler(PARAMS, SPEC, max_slots=4, prefill_chunk=8, compile="inductor")
    busy.warmup()
    handles = _submit_at_random_times(busy, requests, seed=6)
    got = [h.result(timeout=600) for h in handles]
    for (prompt, new, opts), h, tokens in zip(requests, handles, got):
        alone = busy.submit(prompt, max_new_tokens=new, keep_logits=True, **opts)
        assert alone.result(timeout=600) == tokens
        assert all(torch.equal(a, b) for a, b in zip(alone.logits, h.logits))
        want = _alone_logits(prompt, tokens)
        torch.testing.assert_close(torch.stack(h.logits), want, atol=1e-5, rtol=0)
    busy.close()


def test_a_served_request_waiting_for_a_slot_stops_when_its_client_goes():
    from train.recipes import serve_streams

    scheduler = Scheduler(PARAMS, SPEC, max_slots=1, compile=None)
    step = scheduler.slots.decode
    scheduler.slots.decode = lambda *a: (time.sleep(0.05), step(*a))[1]  # 47 tokens: > 2 s
    busy = scheduler.submit([1], max_new_tokens=47)
    next(busy.stream(timeout=30))
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    began = time.perf_counter()
    tokens = serve_streams._scheduled({"scheduler": scheduler}, [2, 3], stop, max_new_tokens=5)
    assert list(tokens) == [] and time.perf_counter() - began < 1.5
    assert len(busy.result(timeout=30)) == 47  # the waiting one was cancelled, not served
    idle = {"waiting": 0, "running": 0, "free_slots": 1}
    deadline = time.perf_counter() + 10
    while scheduler.load != idle and time.perf_counter() < deadline:
        time.sleep(0.01)  # the next iteration drops it
    assert scheduler.load == idle
    scheduler.close()


def test_a_served_gpt2_promises_no_more_new_tokens_than_a_slot_holds(tmp_path):
    from tests.serve.test_gpt_serving import write_gpt2_dir
    from train.recipes import serve

    write_gpt2_dir(tmp_path)
    alone = serve.load_model(tmp_path)
    context = alone.generate_limits["max_new_tokens"][1]
    slotted = serve.load_model(
        tmp_path, batching=serve.Batching(max_slots=2, max_len=20, compile=None)
    )
    assert (context, slotted.generate_limits["max_new_tokens"][1]) == (48, 20)


def test_the_command_line_says_what_the_start_up_does_and_found(tmp_path, capsys):
    from tests.serve.test_gpt_serving import write_gpt2_dir
    from train.recipes import serve

    write_gpt2_dir(tmp_path)
    model = serve.load_model(
        tmp_path, batching=serve.Batching(max_slots=2, max_len=20, compile=None, announce=True)
    )
    said = capsys.readouterr().out.splitlines()
    assert (
        said[0] == "scheduler: probing and compiling the decode step for 2 slots of 20 positions..."
    )
    assert said[1].startswith("scheduler: ready in ") and "rows and [20] key positions" in said[1]
    assert said[1].endswith("linears, math attention")
    assert model.generate is not None
