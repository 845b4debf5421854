"""The worker of tests/distributed/test_distributed.py, launched by torchrun with 2 ranks.

``python -m torch.distributed.run --nproc_per_node 2 tests/scripts/dist_worker.py PHASE OUT``

- ``first``: DDP and FSDP (with and without activation checkpointing) against a
  single-process reference on the same global batch (loss, grads, params after 3 steps);
  FSDP per-rank parameter bytes; then FSDP for 20 steps straight, and a fresh FSDP run of
  10 steps that saves a sharded checkpoint and exits.
- ``resume``: a new process group restores the checkpoint and runs steps 11..20.

Rank 0 writes what it measured to ``OUT/<phase>.json`` (and full params as safetensors);
the test asserts on them. Tiny model, few steps: a launch costs seconds, not minutes.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

import fmm
from fmm import optim
from fmm.adapter import ModelAdapter
from fmm.step import init_state, make_train_step
from models import clip
from train import checkpoint
from train import distributed as D

CFG = dataclasses.replace(
    clip.clip_tiny(vocab_size=13, context_length=6),
    image_size=8,
    patch_size=4,
    image_width=16,
    image_layers=2,
    image_heads=2,
    text_width=12,
    text_layers=2,
    text_heads=3,
    embed_dim=10,
)
GLOBAL_BATCH = 6
STEPS = 20


def schedule():
    return optim.cosine_schedule(3e-3, total_steps=STEPS, warmup_steps=2)


def adamw():
    return optim.adamw(schedule(), weight_decay=0.1)


def init_params():
    # float64: Adam divides grads by their running RMS, which turns float32 reduction-order
    # noise in near-zero grads into lr-sized steps; in float64 that noise sits far below eps.
    return clip.init(CFG, fmm.random.key(0), dtype=torch.float64)


def global_batch(generator: torch.Generator) -> dict:
    return {
        "images": torch.rand(GLOBAL_BATCH, 3, 8, 8, generator=generator, dtype=torch.float64),
        "tokens": torch.randint(1, 13, (GLOBAL_BATCH, 6), generator=generator),
    }


def shard(batch: dict, env: D.Env) -> dict:
    per = GLOBAL_BATCH // env.world_size
    return {k: v[env.rank * per : (env.rank + 1) * per] for k, v in batch.items()}


def build(mode: str | None, *, ac: bool = False):
    adapter = ModelAdapter(
        init_params(),
        functools.partial(clip.loss, cfg=CFG, gather=D.all_gather_with_grad),
        checkpoint=ac,
    )
    model = D.wrap(adapter, mode) if mode else adapter
    step = D.make_step(
        model, adapter, adamw(), loss_call=lambda m, b, k: m(b), mode=mode, max_grad_norm=1.0
    )
    state = {
        "opt_state": adamw().init(fmm.tree.map(lambda p: D.local(p.detach()), adapter.tree())),
        "step": torch.zeros((), dtype=torch.int64),
        "key": fmm.random.key(1),
    }
    return model, adapter, step, state


def max_diff(a, b) -> float:
    fa, fb = fmm.tree.flatten(a), fmm.tree.flatten(b)
    assert fa.keys() == fb.keys()
    return max((fa[k].double() - fb[k].double()).abs().max().item() for k in fa)


def reference(batches):
    """Single process, pure train step, the whole global batch: the ground truth."""
    opt = optim.chain(optim.clip_by_global_norm(1.0), adamw())
    loss_fn = lambda p, b, k: clip.loss(p, b, cfg=CFG)
    live = fmm.tree.map(lambda x: x.requires_grad_(True), init_params())
    loss, _ = clip.loss(live, batches[0], cfg=CFG)
    grads = torch.autograd.grad(loss, fmm.tree.leaves(live))
    grads = torch.utils._pytree.tree_unflatten(
        list(grads), torch.utils._pytree.tree_structure(live)
    )
    state, step, losses = init_state(init_params(), opt, key=fmm.random.key(1)), None, []
    step = make_train_step(loss_fn, opt)
    for b in batches:
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    return loss.detach(), grads, losses, state["params"]


def compare(mode, ac, env, batches, ref) -> dict:
    ref_loss, ref_grads, ref_losses, ref_params = ref
    model, adapter, step, state = build(mode, ac=ac)
    out = {}
    if mode == "fsdp":
        total = sum(p.numel() * p.element_size() for p in fmm.tree.leaves(init_params()))
        out["param_bytes_fraction"] = D.local_param_bytes(model) / total
    loss, _, _, grads = D.backward(
        model, adapter, lambda m, b, k: m(b), shard(batches[0], env), None, mode=mode
    )
    full = fmm.tree.map(lambda g: g.full_tensor() if isinstance(g, DTensor) else g, grads)
    out["loss_diff"] = abs(float(loss) - float(ref_loss))
    out["grad_diff"] = max_diff(full, ref_grads)
    losses, norms = [], []
    for b in batches:
        state, m = step(state, shard(b, env))
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    out["min_grad_norm"] = min(norms)  # above max_grad_norm=1: clipping was active
    out["step_loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses))
    out["param_diff"] = max_diff(D.full_params(model), ref_params)
    return out


def unequal_gather(env: D.Env) -> dict:
    """Ranks holding 2 and 4 rows: size-weighted per-rank losses and their grads equal the
    single-process loss over all 6 rows."""
    g = torch.Generator().manual_seed(11)
    img = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(2.0, dtype=torch.float64)
    rows = [slice(0, 2), slice(2, 6)][env.rank]
    li = img[rows].clone().requires_grad_(True)
    lt = txt[rows].clone().requires_grad_(True)
    n = li.shape[0]
    loss = fmm.losses.contrastive_loss(li, lt, scale, gather=D.all_gather_with_grad) * n / 6
    loss.backward()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    gi, gt = D.all_gather_with_grad(li.grad)[0], D.all_gather_with_grad(lt.grad)[0]
    ri, rt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    ref = fmm.losses.contrastive_loss(ri, rt, scale)
    ref.backward()
    return {
        "loss_diff": abs(float(total) - float(ref)),
        "grad_diff": max((gi - ri.grad).abs().max().item(), (gt - rt.grad).abs().max().item()),
        "offset": D.all_gather_with_grad(li)[1],
    }


def fsdp_decoding(env: D.Env) -> dict:
    """The adapter's cached-decoding entry points on a GPT sharded by FSDP2."""
    from fmm import decoding
    from models import gpt

    cfg = gpt.gpt_tiny(vocab_size=17, context_length=12)
    params = gpt.init(cfg, fmm.random.key(0))
    model = D.wrap(ModelAdapter(params, functools.partial(gpt.apply, cfg=cfg)), "fsdp")
    prompt = torch.randint(0, 17, (2, 5), generator=torch.Generator().manual_seed(0))
    cache = decoding.init_cache(cfg, 2, 12)
    want, want_cache = decoding.prefill(params, prompt, cache, cfg=cfg)
    got, got_cache = model.prefill(prompt, cache, cfg=cfg)
    token = want[:, -1].argmax(-1)
    want_step, _ = decoding.decode_step(params, token, want_cache, cfg=cfg)
    got_step, _ = model.decode_step(token, got_cache, cfg=cfg)
    sharded = isinstance(model.get_parameter("transformer.blocks.0.attn.qkv.weight"), DTensor)
    return {
        "prefill_diff": (got - want).abs().max().item(),
        "decode_diff": (got_step - want_step).abs().max().item(),
        "sharded_after": sharded,
    }


def checkpoint_state(adapter, state, generator):
    params = fmm.tree.map(lambda p: p.detach(), adapter.tree())
    return {
        "params": params,
        "opt_state": D.shard_like(state["opt_state"], params),
        "step": state["step"],
        "key": state["key"],
        "data": {"generator": generator.get_state()},
    }


def train(env, steps, state, step, generator):
    losses = []
    for _ in range(steps):
        state, m = step(state, shard(global_batch(generator), env))
        losses.append(float(m["loss"]))
    return state, losses


def first(env: D.Env, out: Path) -> dict:
    g = torch.Generator().manual_seed(7)
    batches = [global_batch(g) for _ in range(3)]
    ref = reference(batches)
    results = {
        "ddp": compare("ddp", False, env, batches, ref),
        "fsdp": compare("fsdp", False, env, batches, ref),
        "fsdp_ac": compare("fsdp", True, env, batches, ref),
        "unequal": unequal_gather(env),
        "decoding": fsdp_decoding(env),
    }
    # 20 steps straight, then 10 steps + a sharded checkpoint (the process then exits).
    model, adapter, step, state = build("fsdp")
    _, straight = train(env, STEPS, state, step, torch.Generator().manual_seed(3))
    final = D.full_params(model)
    model, adapter, step, state = build("fsdp")
    g = torch.Generator().manual_seed(3)
    state, losses = train(env, STEPS // 2, state, step, g)
    checkpoint.save_sharded(out / "ckpt", STEPS // 2, checkpoint_state(adapter, state, g))
    half = D.full_params(model)
    # One more step at 2 ranks from the checkpoint, to compare with a 1-rank resume.
    _, next_loss = train(env, 1, state, step, g)
    if env.is_main:
        checkpoint.save_params(out / "straight.safetensors", final)
        checkpoint.save_params(out / "half.safetensors", half)
    results.update(straight_losses=straight, first_losses=losses, next_loss=next_loss[0])
    return results


def resume(env: D.Env, out: Path) -> dict:
    model, adapter, step, state = build("fsdp")
    g = torch.Generator()
    ckpt = checkpoint_state(adapter, state, g)
    at, _ = checkpoint.load_sharded(out / "ckpt", ckpt)
    g.set_state(ckpt["data"]["generator"])
    state = {"opt_state": state["opt_state"], "step": ckpt["step"], "key": ckpt["key"]}
    state, losses = train(env, STEPS - at, state, step, g)
    final = D.full_params(model)
    if env.is_main:
        checkpoint.save_params(out / "resumed.safetensors", final)
    return {"resumed_from": at, "resumed_losses": losses}


def main() -> None:
    phase, out = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)  # nothing should draw from it; fixed anyway
    env = D.setup("cpu")
    try:
        results = {"first": first, "resume": resume}[phase](env, out)
        if env.is_main:
            checkpoint.write_json(out / f"{phase}.json", {"world_size": env.world_size, **results})
    finally:
        D.teardown()


if __name__ == "__main__":
    main()
