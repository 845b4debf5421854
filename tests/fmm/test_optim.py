"""Parity of fmm/optim.py with torch.optim, plus purity, compile and vmap laws."""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

from fmm.optim import (
    Optimizer,
    adamw,
    apply_updates,
    chain,
    clip_by_global_norm,
    constant_schedule,
    cosine_schedule,
    ema_update,
    global_norm,
    sgd,
)

STEPS = 10


def make_params(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return {
        "embed": r(7, 5),
        "blocks": [{"weight": r(3, 5), "bias": r(3)}, {"weight": r(5, 3), "bias": r(5)}],
        "log_temp": r(()),
    }


def grad_seq(params, steps: int = STEPS, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        pytree.tree_map(lambda p: torch.randn(p.shape, generator=g), params) for _ in range(steps)
    ]


def run_ours(opt: Optimizer, params, grads_seq):
    state = opt.init(params)
    for grads in grads_seq:
        updates, state = opt.update(grads, state, params)
        params = apply_updates(params, updates)
    return params


def run_torch(make_opt, params, grads_seq, make_sched=None):
    """Train clones of ``params`` with a torch.optim optimizer on the same grads."""
    leaves, spec = pytree.tree_flatten(params)
    tparams = [p.clone().requires_grad_(True) for p in leaves]
    opt = make_opt(tparams)
    sched = make_sched(opt) if make_sched else None
    for grads in grads_seq:
        for p, g in zip(tparams, pytree.tree_leaves(grads)):
            p.grad = g.clone()
        opt.step()
        if sched:
            sched.step()
    return pytree.tree_unflatten([p.detach() for p in tparams], spec)


def assert_trees_close(a, b, atol=1e-6):
    sa = pytree.tree_structure(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb
    for path_x, y in zip(pytree.tree_leaves_with_path(a), lb):
        path, x = path_x
        diff = (x - y).abs().max().item() if x.numel() else 0.0
        assert diff <= atol, f"{pytree.keystr(path)}: max abs diff {diff}"


def decay_groups(tparams, weight_decay):
    return [
        {"params": [p for p in tparams if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in tparams if p.ndim < 2], "weight_decay": 0.0},
    ]


# ----------------------------------------------------------------------------- parity


def test_adamw_matches_torch():
    params = make_params()
    grads = grad_seq(params)
    ours = run_ours(adamw(1e-2, weight_decay=0.1), params, grads)
    ref = run_torch(lambda ps: torch.optim.AdamW(decay_groups(ps, 0.1), lr=1e-2), params, grads)
    assert_trees_close(ours, ref)


def test_adamw_decay_mask_by_path():
    params = make_params()
    grads = grad_seq(params)
    # Decay only the first block's weight; torch gets the same split by leaf index.
    mask = lambda path: path == "blocks.0.weight"
    ours = run_ours(adamw(1e-2, weight_decay=0.1, decay_mask=mask), params, grads)
    paths = [p for p, _ in pytree.tree_leaves_with_path(params)]

    def make(ps):
        flags = [pytree.keystr(k) == "['blocks'][0]['weight']" for k in paths]
        return torch.optim.AdamW(
            [
                {"params": [p for p, f in zip(ps, flags) if f], "weight_decay": 0.1},
                {"params": [p for p, f in zip(ps, flags) if not f], "weight_decay": 0.0},
            ],
            lr=1e-2,
        )

    assert_trees_close(ours, run_torch(make, params, grads))


def test_adamw_cosine_matches_lambda_lr():
    peak, total, warmup, final = 1e-2, 8, 3, 1e-3

    def factor(step: int) -> float:  # independent Python reference of the schedule
        if step >= total:
            return final / peak
        if step < warmup:
            return step / warmup
        cos = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        return (final + (peak - final) * cos) / peak

    params = make_params()
    grads = grad_seq(params)
    sched = cosine_schedule(peak, total_steps=total, warmup_steps=warmup, final=final)
    ours = run_ours(adamw(sched, weight_decay=0.1), params, grads)
    ref = run_torch(
        lambda ps: torch.optim.AdamW(decay_groups(ps, 0.1), lr=peak),
        params,
        grads,
        make_sched=lambda o: torch.optim.lr_scheduler.LambdaLR(o, factor),
    )
    assert_trees_close(ours, ref)


@pytest.mark.parametrize(
    "momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.1)]
)
def test_sgd_matches_torch(momentum, nesterov, weight_decay):
    params = make_params()
    grads = grad_seq(params)
    kw = dict(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    ours = run_ours(sgd(1e-2, **kw), params, grads)
    ref = run_torch(lambda ps: torch.optim.SGD(ps, lr=1e-2, **kw), params, grads)
    assert_trees_close(ours, ref)


def test_constant_schedule_equals_float_lr():
    params = make_params()
    grads = grad_seq(params, steps=3)
    a = run_ours(adamw(1e-2), params, grads)
    b = run_ours(adamw(constant_schedule(1e-2)), params, grads)
    assert_trees_close(a, b, atol=1e-7)  # float64 Python lr vs a float32 tensor lr


# ----------------------------------------------------------------------------- clipping


def test_clip_by_global_norm_bounds_norm():
    grads = pytree.tree_map(lambda p: 10 * p, make_params())
    assert global_norm(grads) > 1.0
    opt = clip_by_global_norm(1.0)
    clipped, _ = opt.update(grads, opt.init(grads), None)
    assert global_norm(clipped) <= 1.0 + 1e-6
    # Direction is kept: clipping is one common scale.
    ratio = clipped["embed"] / grads["embed"]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))


def test_clip_by_global_norm_leaves_small_grads():
    grads = make_params()
    opt = clip_by_global_norm(2 * global_norm(grads).item())
    clipped, _ = opt.update(grads, opt.init(grads), None)
    assert_trees_close(clipped, grads, atol=0.0)


def test_global_norm_matches_flat_norm():
    tree = make_params()
    flat = torch.cat([x.flatten() for x in pytree.tree_leaves(tree)])
    torch.testing.assert_close(global_norm(tree), flat.norm())


# ----------------------------------------------------------------------------- schedules


@given(
    total=st.integers(1, 40),
    warmup_frac=st.floats(0, 1),
    peak=st.floats(1e-4, 1.0),
    final_frac=st.floats(0, 1),
)
def test_cosine_schedule_shape(total, warmup_frac, peak, final_frac):
    warmup = int(warmup_frac * total)
    final = final_frac * peak
    sched = cosine_schedule(peak, total_steps=total, warmup_steps=warmup, final=final)
    lr = lambda t: sched(torch.tensor(t)).item()
    tol = 1e-6 * peak
    if warmup > 0:
        assert lr(0) == 0.0
    if warmup < total:
        assert lr(warmup) == pytest.approx(peak, rel=1e-6)
    assert lr(total) == pytest.approx(final, rel=1e-6, abs=tol)
    assert lr(total + 5) == pytest.approx(final, rel=1e-6, abs=tol)
    values = [lr(t) for t in range(warmup, total + 3)]
    assert all(b <= a + tol for a, b in itertools.pairwise(values))


# ----------------------------------------------------------------------------- purity


@pytest.mark.parametrize(
    "opt",
    [
        adamw(1e-2, weight_decay=0.1),
        sgd(1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
        chain(clip_by_global_norm(0.5), adamw(cosine_schedule(1e-2, total_steps=5))),
    ],
    ids=["adamw", "sgd", "chain"],
)
def test_update_is_pure(opt):
    params = make_params()
    grads = grad_seq(params, steps=1)[0]
    _, state = opt.update(grads, opt.init(params), params)  # a non-trivial state
    snapshot = pytree.tree_map(torch.clone, (grads, state, params))
    updates, new_state = opt.update(grads, state, params)
    assert_trees_close((grads, state, params), snapshot, atol=0.0)
    new_params = apply_updates(params, updates)
    assert_trees_close(params, snapshot[2], atol=0.0)
    # New tensors, never aliases of the inputs.
    ins = {id(x) for x in pytree.tree_leaves((grads, state, params))}
    assert not ins & {id(x) for x in pytree.tree_leaves((updates, new_state, new_params))}


# ----------------------------------------------------------------------------- compile


def compile_opt() -> Optimizer:
    sched = cosine_schedule(1e-2, total_steps=8, warmup_steps=2, final=1e-3)
    return chain(clip_by_global_norm(1.0), adamw(sched, weight_decay=0.1))


def step(opt, grads, state, params):
    updates, state = opt.update(grads, state, params)
    return apply_updates(params, updates), state


@pytest.fixture(scope="module")
def compiled_step():
    torch._dynamo.reset()
    opt = compile_opt()
    return opt, torch.compile(lambda g, s, p: step(opt, g, s, p), fullgraph=True)


def test_compiled_step_matches_eager_without_recompiles(compiled_step):
    opt, fn = compiled_step
    params = make_params()
    grads = grad_seq(params)
    eager_p, eager_s = params, opt.init(params)
    comp_p, comp_s = params, opt.init(params)
    for i, g in enumerate(grads):
        eager_p, eager_s = step(opt, g, eager_s, eager_p)
        if i == 0:
            comp_p, comp_s = fn(g, comp_s, comp_p)
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                comp_p, comp_s = fn(g, comp_s, comp_p)
        if i == 2:
            assert_trees_close(comp_p, eager_p)
    assert_trees_close(comp_p, eager_p)
    assert comp_s[1]["count"].item() == STEPS


# ----------------------------------------------------------------------------- vmap


@pytest.mark.parametrize(
    "opt",
    [compile_opt(), sgd(1e-2, momentum=0.9, weight_decay=0.1)],
    ids=["clip+adamw+cosine", "sgd"],
)
def test_vmap_over_ensemble_equals_loop(opt):
    members = [make_params(seed) for seed in range(3)]
    grads = [grad_seq(p, steps=2, seed=10 + i) for i, p in enumerate(members)]
    stack = lambda trees: pytree.tree_map(lambda *xs: torch.stack(xs), *trees)

    # Loop: each member trained alone.
    loop = [run_ours(opt, p, g) for p, g in zip(members, grads)]

    # vmap: all members at once, with a vmapped init (count is broadcast).
    update = torch.func.vmap(lambda g, s, p: opt.update(g, s, p))
    params = stack(members)
    state = torch.func.vmap(opt.init)(params)
    for k in range(2):
        updates, state = update(stack([g[k] for g in grads]), state, params)
        params = apply_updates(params, updates)
    assert_trees_close(params, stack(loop))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: adamw(0.0), "lr"),
        (lambda: adamw(-1e-3), "lr"),
        (lambda: sgd(0.0), "lr"),
        (lambda: adamw(1e-3, b1=1.0), "b1"),
        (lambda: adamw(1e-3, b1=-0.1), "b1"),
        (lambda: adamw(1e-3, b2=1.0), "b2"),
        (lambda: clip_by_global_norm(0.0), "max_norm"),
        (lambda: cosine_schedule(1e-3, total_steps=5, warmup_steps=6), "warmup_steps"),
        (lambda: sgd(1e-3, nesterov=True), "nesterov"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@given(decay=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_ema_update_mixes_over_the_averages_parts_in_their_dtypes(decay, seed):
    g = torch.Generator().manual_seed(seed)
    average = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).double()}
    params = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).double(),
              "head": torch.randn(2)}  # fmt: skip
    before = {k: v.clone() for k, v in average.items()}
    out = ema_update(average, params, torch.tensor(decay))
    assert set(out) == {"w", "b"} and out["b"].dtype == torch.float64
    for k in out:
        want = decay * before[k] + (1 - decay) * params[k]
        torch.testing.assert_close(out[k], want.to(out[k].dtype), atol=1e-6, rtol=1e-6)
        assert torch.equal(average[k], before[k])  # the input is untouched
    assert torch.equal(ema_update(average, params, 1.0)["w"], average["w"])
    assert torch.equal(ema_update(average, params, 0.0)["w"], params["w"])
