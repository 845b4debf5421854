"""train.serve.scheduler with a per-request cross-attention context: CoCa captions of
images submitted at different times through one Scheduler equal each image's captions
alone (greedy tokens identical, logits within 1e-5); bad contexts are refused."""

import time

import pytest
import torch

import fmm
import models.coca as coca
from models import gpt
from tests.fmm.test_batching_context import (
    CFG,
    IMAGES,
    PARAMS,
    QUERIES,
    SOT,
    SPEC,
    TOL,
    _alone,
)
from train.serve.scheduler import Scheduler

GPT = gpt.GPTConfig(vocab_size=97, context_length=16, width=32, layers=1, heads=4)
GPT_PARAMS = gpt.init(GPT, fmm.random.key(0))


def _scheduler(**kw) -> Scheduler:
    return Scheduler(PARAMS, SPEC, max_slots=4, prefill_chunk=4, compile=None,
                     context_len=CFG.caption_queries, **kw)  # fmt: skip


def _when(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(1e-4)


def test_captions_through_the_scheduler_equal_each_image_alone():
    # Long captions (every position of a slot), each submitted once the one before has
    # its first tokens: they join a pool that is already decoding.
    steps = SPEC.max_positions
    masked = torch.arange(CFG.caption_queries) < CFG.caption_queries - 2
    scheduler = _scheduler()
    scheduler.warmup()
    try:
        handles = []
        for i in range(3):
            # Image 1 also masks its last two queries: the mask travels with its request.
            handles.append(scheduler.submit([SOT], max_new_tokens=steps, context=QUERIES[i],
                                            context_mask=masked if i == 1 else None,
                                            keep_logits=True))  # fmt: skip
            _when(lambda: len(handles[-1].tokens) >= 2 or handles[-1].done)
        results = [h.result() for h in handles]
    finally:
        scheduler.close()
    assert scheduler.steps < 3 * (steps - 1), scheduler.steps  # some steps decode two together
    captions = coca.generate_captions(PARAMS, IMAGES, cfg=CFG, sot_id=SOT, max_new_tokens=steps)
    for i in range(3):
        tokens, logits = _alone(i, masked[None] if i == 1 else None, steps)
        assert results[i] == tokens.tolist()
        if i != 1:
            assert results[i] == captions.tokens[i].tolist()
        torch.testing.assert_close(torch.stack(handles[i].logits), logits, **TOL)


def test_bad_contexts_are_refused_naming_the_argument():
    scheduler = _scheduler()
    try:
        for bad, name in [
            (dict(), "context"),
            (dict(context=QUERIES[0, :3]), "context"),
            (dict(context=QUERIES[0].long()), "context"),
            (dict(context=QUERIES[0] * float("nan")), "context"),
            (dict(context=QUERIES[0], context_mask=torch.zeros(3, dtype=torch.bool)), "mask"),
            (dict(context=QUERIES[0], context_mask=torch.zeros(CFG.caption_queries,
                                                               dtype=torch.bool)), "mask"),
        ]:  # fmt: skip
            with pytest.raises(ValueError, match=name):
                scheduler.submit([SOT], max_new_tokens=2, **bad)
    finally:
        scheduler.close()
    with pytest.raises(ValueError, match="context_len"):
        Scheduler(PARAMS, SPEC, max_slots=2, compile=None)
    # A token-only model refuses a context, and a context length.
    gpt_scheduler = Scheduler(GPT_PARAMS, gpt.decoder_spec(GPT), max_slots=2, compile=None)
    try:
        with pytest.raises(ValueError, match="context"):
            gpt_scheduler.submit([1], max_new_tokens=2, context=QUERIES[0])
    finally:
        gpt_scheduler.close()
    with pytest.raises(ValueError, match="context_len"):
        Scheduler(GPT_PARAMS, gpt.decoder_spec(GPT), max_slots=2, compile=None, context_len=8)
