"""The worker of tests/distributed/test_families.py: every registered family through the
loop's module path (``train.loop.engine.ModuleTrainer``, FSDP2 and DDP, activation
checkpointing on) at 2 ranks, against one process on the same global batches.

``python -m torch.distributed.run --nproc_per_node 2 tests/scripts/dist_families.py OUT``

What the one process computes, step ``n`` with base key ``k`` (each rank ``r`` holds rows
``[r B/2, (r+1) B/2)`` and draws from ``fold_in(fold_in(k, n), r)``):

- **clip**: the loss of the whole global batch (its contrastive term gathers every rank's
  embeddings, so the ranks' mean is the global-batch loss).
- every other family (**mmgpt**, **albef**, **bert**, **gpt**, **vqvae**, and any family
  registered later whose loss does not gather), on its smallest preset: the mean of the
  per-rank losses over the same halves with the same per-rank keys, i.e. gradient
  accumulation over the ranks' micro-batches (ALBEF's hard negatives and MLM masks pair
  examples within a half). A train state (ALBEF's momentum encoders and queues, the
  VQ-VAE's EMA codebook): both halves read the same state, and after the step
  ``update_state`` gets the new params and both halves' ``aux`` rows in rank order (what
  the ranks' gathered ``aux`` holds), so every rank's state is the one process's.
- **flava**: that mean, with its contrastive term taken over the whole global batch (it
  gathers); its ITM negatives, MLM/MIM masks and MMM terms stay per half.
- **coca**: that mean, with its contrastive term taken over the whole global batch (it
  gathers); the captioning term stays per half.

Then clipping to norm 1 and AdamW, twice. Rank 0 writes the differences (loss of each step,
step-1 grads, params and train state after two steps) to ``OUT/families.json``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

import fmm
import models
from fmm.losses import contrastive_loss
from fmm.optim import apply_updates, global_norm
from fmm.step import clip_grads
from models import clip, coca, flava
from models.family import example_batch
from train import checkpoint
from train import distributed as D
from train.loop.engine import ModuleTrainer, Training, optimizer_for
from train.loop.source import rows_of

BATCH, STEPS, WORLD = 4, 2, 2
# Families whose loss gathers across ranks need their own statement of the one process's
# loss (see the module docstring), on a config small enough for float64 on 2 processes.
GATHERING = {
    "clip": dataclasses.replace(
        clip.clip_tiny(vocab_size=13, context_length=6), image_size=8, patch_size=4,
        image_width=16, image_layers=2, image_heads=2, text_width=12, text_layers=2,
        text_heads=3, embed_dim=10,
    ),
    "flava": flava.flava_tiny(vocab_size=20, max_positions=8, image_vocab_size=9),
    "coca": coca.coca_tiny(),
}  # fmt: skip


def smallest(family):
    """The family's preset with the fewest params (counted on the meta device)."""
    meta = fmm.random.key(0).to("meta")
    sizes = {n: fmm.tree.count(family.init(b(), meta)) for n, b in family.presets.items()}
    return family.presets[min(sizes, key=sizes.get)]()


def cases() -> dict:
    """Every registered family: the others on their smallest preset, whose per-rank terms
    make the one process's loss the mean over the halves."""
    out = {}
    for family in models.FAMILIES:
        if "gather" in family.loss_extras and family.name not in GATHERING:
            raise SystemExit(f"{family.name} gathers across ranks: state its reference here")
        out[family.name] = (family, GATHERING.get(family.name) or smallest(family))
    return out


def _optimizer():
    # No warmup: the first step must move the params, or a family whose init predicts a
    # uniform distribution whatever the batch (VideoGPT's zero head) computes one loss twice.
    return optimizer_for(lr=3e-3, steps=10, warmup=0, weight_decay=0.1)


def _batches(family, cfg) -> list[dict]:
    fields = family.batch(cfg)
    out = []
    for n in range(STEPS):
        batch = example_batch(fields, fmm.random.key(10 + n), batch_size=BATCH)
        out.append({k: v.double() if v.is_floating_point() else v for k, v in batch.items()})
    return out


def _halves(batch, fields):
    return [rows_of(batch, fields, rank=r, world_size=WORLD) for r in range(WORLD)]


def _loss(family, cfg, p, batch, key, state):
    extras = {"state": state} if state is not None else {}
    return family.loss(p, batch, cfg=cfg, key=key, train=True, **extras)


def _contrastive(p, batch, cfg):
    valid = batch["tokens"] != cfg.pad_id
    image = flava.embed_image(p, batch["images"], cfg=cfg)
    text = flava.embed_text(p, batch["tokens"], cfg=cfg, attention_mask=valid)
    return contrastive_loss(image, text, p["heads"]["logit_scale"])


def objective(name, family, cfg, p, batch, halves, keys, state):
    """The one process's loss of a global batch and the halves' aux, as the docstring says."""
    if name == "clip":
        value, _ = _loss(family, cfg, p, batch, keys[0], state)
        return value, [], {}
    parts = [_loss(family, cfg, p, h, k, state) for h, k in zip(halves, keys)]
    value = sum(v for v, _ in parts) / len(parts)
    checks = {}
    if name == "flava":
        w = cfg.pretrain.weight("contrastive")
        local = [_contrastive(p, h, cfg) for h in halves]
        # the contrastive term recomputed here is the one inside the loss (sanity)
        checks["contrastive_recomputed"] = max(
            abs(float(c) - float(m["contrastive"])) for c, (_, m) in zip(local, parts)
        )
        value = value - w * sum(local) / len(local) + w * _contrastive(p, batch, cfg)
    if name == "coca":
        # the contrastive term over the global batch, the captioning one per half
        only = dataclasses.replace(cfg, caption_weight=0.0)
        term = lambda b: family.loss(p, b, cfg=only, key=None)[0]
        value = value - sum(term(h) for h in halves) / len(halves) + term(batch)
    return value, [m.get("aux", {}) for _, m in parts], checks


def reference(name, family, cfg, params, state, batches, key):
    fields, opt = family.batch(cfg), _optimizer()
    opt_state, losses, first_grads, checks = opt.init(params), [], None, {}
    for n, batch in enumerate(batches):
        step_key = fmm.random.fold_in(key, n)
        keys = [fmm.random.fold_in(step_key, r) for r in range(WORLD)]
        leaves, spec = torch.utils._pytree.tree_flatten(params)
        live = [x.detach().requires_grad_(True) for x in leaves]
        p = torch.utils._pytree.tree_unflatten(live, spec)
        value, auxes, checks = objective(
            name, family, cfg, p, batch, _halves(batch, fields), keys, state
        )
        grads = torch.autograd.grad(value, live, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
        grads = torch.utils._pytree.tree_unflatten(grads, spec)
        first_grads = first_grads if first_grads is not None else grads
        losses.append(float(value.detach()))
        grads = clip_grads(grads, global_norm(grads), 1.0)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = apply_updates(params, updates)
        if state is not None:
            aux = fmm.tree.map(lambda *rows: torch.cat(rows), *auxes)
            params, state = family.update_state(
                state, params, aux, cfg=cfg, key=fmm.random.fold_in(step_key, "state")
            )
    return losses, first_grads, params, state, checks


def distributed(family, cfg, params, state, batches, key, env, mode):
    fields = family.batch(cfg)
    state0 = None if state is None else fmm.tree.map(torch.clone, state)
    what = Training(family, cfg, fmm.tree.map(torch.clone, params), state0, _optimizer(), key)
    trainer = ModuleTrainer(what, env=env, mode=mode, ac=True, precision="fp32")
    mine = [_halves(b, fields)[env.rank] for b in batches]
    whole = trainer.model_state()
    extras = {} if whole is None else {"state": whole}
    call = lambda m, b, k: m(b, key=k, train=True, **extras)
    k0 = fmm.random.fold_in(fmm.random.fold_in(key, 0), env.rank)
    _, _, _, grads = D.backward(trainer.model, trainer.adapter, call, mine[0], k0, mode=mode)
    grads = fmm.tree.map(D.whole, grads)
    losses = [float(trainer.step(b)["loss"]) for b in mine]
    block_params = [p for b in trainer.adapter.block_modules() for p in b.parameters() if p.ndim]
    state_leaves = fmm.tree.leaves(trainer.state.get("model_state", {}))
    sharded = {
        "blocks": [len(block_params), sum(isinstance(p, DTensor) for p in block_params)],
        "state": [isinstance(x, DTensor) for x in state_leaves],
    }
    return losses, grads, trainer.params(), trainer.model_state(), sharded


def _diff(a, b) -> float:
    fa, fb = fmm.tree.flatten(a), fmm.tree.flatten(b)
    assert fa.keys() == fb.keys(), sorted(fa.keys() ^ fb.keys())
    return max((fa[k].double() - fb[k].double()).abs().max().item() for k in fa)


def case(family, cfg, env) -> dict:
    name = family.name
    params = family.init(cfg, fmm.random.key(0), dtype=torch.float64)
    state = None
    if family.init_state is not None:
        state = family.init_state(cfg, params, fmm.random.key(1))
        state = fmm.tree.map(lambda x: x.double() if x.is_floating_point() else x, state)
    batches, key = _batches(family, cfg), fmm.random.key(2)
    ref = reference(name, family, cfg, params, state, batches, key)
    results = {}
    for mode in ("fsdp", "ddp"):
        got = distributed(family, cfg, params, state, batches, key, env, mode)
        out = {
            "loss_diff": max(abs(a - b) for a, b in zip(ref[0], got[0])),
            "grad_diff": _diff(ref[1], got[1]),
            "param_diff": _diff(ref[2], got[2]),
            "losses": got[0],
            "block_params": got[4]["blocks"][0],
            "block_params_sharded": got[4]["blocks"][1],
            **ref[4],
        }
        if state is not None:
            out["state_diff"] = _diff(ref[3], got[3])
            out["state_leaves_sharded"] = sum(got[4]["state"])
            out["state_leaves"] = len(got[4]["state"])
        results[mode] = out
    return results


def main() -> None:
    out = Path(sys.argv[1])
    env = D.setup("cpu")
    try:
        results = {name: case(family, cfg, env) for name, (family, cfg) in cases().items()}
        if env.is_main:
            checkpoint.write_json(out / "families.json", {"world_size": env.world_size, **results})
    finally:
        D.teardown()


if __name__ == "__main__":
    main()
