"""fmm.batching with a per-slot cross-attention context: CoCa captions decoded in one slot
pool, each slot reading its own image's keys, equal each image's captions alone."""

import pytest
import torch

import fmm
import models.coca as coca
from fmm import batching, decoding
from models.coca.generate import decoder_spec

CFG = coca.coca_tiny()
SPEC = decoder_spec(CFG)
PARAMS = coca.init(CFG, fmm.random.key(0))
IMAGES = fmm.random.normal(fmm.random.key(1), (3, *coca.image_shape(CFG)))
QUERIES = coca.image_queries(PARAMS, IMAGES, cfg=CFG)
SOT, STEPS, SLOTS = 1, 6, 4
TOL = dict(atol=1e-5, rtol=1e-5)


def _alone(i: int, context_mask=None, steps=STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [steps] and their logits [steps, vocab] of image i, batch 1 (fmm.decoding);
    ``context_mask [1, T]``: its real queries."""
    cache = decoding.init_cache(SPEC, 1, steps, context_len=CFG.caption_queries)
    logits, cache = decoding.prefill(
        PARAMS, torch.tensor([[SOT]]), cache, cfg=SPEC, context=QUERIES[i : i + 1],
        context_mask=context_mask,
    )  # fmt: skip
    out = [logits[0, -1]]
    for _ in range(steps - 1):
        step, cache = decoding.decode_step(PARAMS, out[-1].argmax()[None], cache, cfg=SPEC)
        out.append(step[0])
    logits = torch.stack(out)
    return logits.argmax(-1), logits


def _pool() -> dict:
    return decoding.init_cache(SPEC, SLOTS, SPEC.max_positions, context_len=CFG.caption_queries)


@torch.no_grad()
def test_captions_admitted_at_different_steps_equal_each_image_alone():
    # Image i joins slot (2, 0, 3)[i] at step 2 * i, so slots hold different images, decode
    # together and leave the pool at different steps.
    slot_of, admit = (2, 0, 3), (0, 2, 4)
    pool, feed = _pool(), torch.zeros(SLOTS, dtype=torch.int64)
    active = torch.zeros(SLOTS, dtype=torch.bool)
    logits = {i: [] for i in range(3)}
    for step in range(admit[-1] + STEPS):
        for i in range(3):
            if step == admit[i]:
                last = batching.prefill_slot(
                    PARAMS, torch.tensor([SOT]), pool, slot_of[i], cfg=SPEC,
                    context=QUERIES[i : i + 1],
                )  # fmt: skip
                logits[i].append(last)
                active[slot_of[i]] = True
        for i in range(3):
            if len(logits[i]) == STEPS:
                active[slot_of[i]] = False
            elif len(logits[i]) > 0 and active[slot_of[i]]:
                feed[slot_of[i]] = logits[i][-1].argmax()
        if not active.any():
            break
        out, pool = batching.decode_slots(PARAMS, feed, pool, active, cfg=SPEC)
        for i in range(3):
            if active[slot_of[i]]:
                logits[i].append(out[slot_of[i]])
    captions = coca.generate_captions(PARAMS, IMAGES, cfg=CFG, sot_id=SOT, max_new_tokens=STEPS)
    for i in range(3):
        tokens, want = _alone(i)
        got = torch.stack(logits[i][:STEPS])
        assert torch.equal(got.argmax(-1), tokens)
        assert torch.equal(tokens, captions.tokens[i])
        torch.testing.assert_close(got, want, **TOL)


@torch.no_grad()
@pytest.mark.parametrize("slots", [[1, 2], [3, 0]], ids=["packed", "gathered"])
def test_prefill_slots_writes_each_slot_its_own_context_and_mask(slots):
    # Two images in one batched prefill (consecutive slots are a view, others gathered);
    # the second masks its last three queries: its logits are the masked prefill alone.
    mask = torch.ones(2, CFG.caption_queries, dtype=torch.bool)
    mask[1, -3:] = False
    pool = _pool()
    got = batching.prefill_slots(
        PARAMS, torch.full((2, 1), SOT), pool, slots, cfg=SPEC, context=QUERIES[:2],
        context_mask=mask,
    )  # fmt: skip
    for row, s in enumerate(slots):
        alone = decoding.init_cache(SPEC, 1, 1, context_len=CFG.caption_queries)
        want, cache = decoding.prefill(
            PARAMS, torch.tensor([[SOT]]), alone, cfg=SPEC, context=QUERIES[row : row + 1],
            context_mask=mask[row : row + 1],
        )  # fmt: skip
        torch.testing.assert_close(got[row], want[0, -1], **TOL)
        assert torch.equal(pool["context_mask"][s], mask[row])
        for dst, src in zip(pool["layers"], cache["layers"]):
            if "ck" in src:
                torch.testing.assert_close(dst["ck"][s], src["ck"][0], **TOL)
                torch.testing.assert_close(dst["cv"][s], src["cv"][0], **TOL)


@torch.no_grad()
def test_one_context_serves_every_row_and_move_slot_carries_it():
    pool = _pool()
    batching.prefill_slots(
        PARAMS, torch.full((2, 1), SOT), pool, [0, 1], cfg=SPEC, context=QUERIES[2:3]
    )
    assert all(torch.equal(layer["ck"][0], layer["ck"][1]) for layer in pool["layers"]
               if "ck" in layer)  # fmt: skip
    # Slot 1 moves to 3: its next step reads image 2's keys from slot 3, as it would have.
    feed, active = torch.full((SLOTS,), 5), torch.tensor([True, False, False, False])
    before, _ = batching.decode_slots(PARAMS, feed, pool, active, cfg=SPEC)
    batching.move_slot(pool, 1, 3)
    after, _ = batching.decode_slots(PARAMS, feed, pool, active.roll(3), cfg=SPEC)
    assert torch.equal(after[3], before[0])


def test_a_cross_attending_slot_needs_its_context():
    with pytest.raises(ValueError, match="context= is missing"):
        batching.prefill_slot(PARAMS, torch.tensor([SOT]), _pool(), 0, cfg=SPEC)
    with pytest.raises(ValueError, match="context"):
        batching.prefill_slots(
            PARAMS, torch.full((2, 1), SOT), _pool(), [0, 1], cfg=SPEC, context=QUERIES
        )
