"""The pure train step: eager == compiled, no recompiles, purity, both gradient engines."""

import dataclasses

import pytest
import torch
import torch._dynamo

import fmm
from models import clip
from train import optim
from train.step import init_state, make_train_step

CFG = dataclasses.replace(
    clip.clip_tiny(vocab_size=13, context_length=6),
    image_size=8,
    patch_size=4,
    image_width=12,
    image_layers=1,
    image_heads=3,
    text_width=9,
    text_layers=1,
    text_heads=3,
    embed_dim=7,
)
OPT = optim.chain(
    optim.clip_by_global_norm(1.0),
    optim.adamw(optim.cosine_schedule(1e-2, total_steps=20, warmup_steps=2), weight_decay=0.1),
)


def loss_fn(p, batch, key):
    return clip.loss(p, batch, cfg=CFG)


def _batches(n, b=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "images": torch.rand(b, 3, 8, 8, generator=g, dtype=dtype),
            "tokens": torch.randint(1, 13, (b, 6), generator=g),
        }
        for _ in range(n)
    ]


def _state(seed=0, dtype=torch.float32):
    return init_state(clip.init(CFG, fmm.random.key(seed), dtype=dtype), OPT, key=fmm.random.key(1))


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(fmm.tree.leaves(a), fmm.tree.leaves(b)))


@pytest.fixture(scope="module")
def compiled_step():
    return make_train_step(loss_fn, OPT, compile=True)


def test_compiled_step_equals_eager_after_3_steps(compiled_step):
    # float64: the key bias of attention has a gradient that is exactly zero in exact
    # arithmetic; in float32 its rounding noise (~1e-9) is normalised by Adam to steps of
    # ~lr whose sign differs between kernels. In float64 that noise sits far below eps.
    eager = make_train_step(loss_fn, OPT)
    s_e, s_c = _state(dtype=torch.float64), _state(dtype=torch.float64)
    for batch in _batches(3, dtype=torch.float64):
        s_e, m_e = eager(s_e, batch)
        s_c, m_c = compiled_step(s_c, batch)
    assert _max_diff(s_e["params"], s_c["params"]) < 1e-5
    torch.testing.assert_close(m_e["loss"], m_c["loss"], atol=1e-5, rtol=0)


def test_compiled_step_does_not_recompile_across_10_steps(compiled_step):
    s = _state(dtype=torch.float64)
    batches = _batches(10, dtype=torch.float64)
    s, _ = compiled_step(s, batches[0])  # the graph of the first test may already serve
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in batches[1:]:
            s, _ = compiled_step(s, batch)
    assert int(s["step"]) == 10


def test_step_is_pure_and_learns():
    step = make_train_step(loss_fn, OPT)
    s0 = _state()
    before = {k: v.clone() for k, v in fmm.tree.flatten(s0["params"]).items()}
    batch = _batches(1)[0]
    s, first = step(s0, batch)
    assert all(torch.equal(before[k], v) for k, v in fmm.tree.flatten(s0["params"]).items())
    assert int(s0["step"]) == 0 and int(s["step"]) == 1
    for _ in range(30):
        s, m = step(s, batch)
    assert m["loss"] < first["loss"] and {"loss", "grad_norm", "logit_scale"} <= m.keys()


def test_func_engine_equals_autograd_engine():
    batches = _batches(3)
    a, b = _state(), _state()
    step_a, step_f = make_train_step(loss_fn, OPT), make_train_step(loss_fn, OPT, engine="func")
    for batch in batches:
        a, _ = step_a(a, batch)
        b, _ = step_f(b, batch)
    assert _max_diff(a["params"], b["params"]) < 1e-6


def test_vmapped_func_step_trains_an_ensemble_like_a_loop():
    step = make_train_step(loss_fn, OPT, engine="func")
    states = [_state(seed) for seed in range(3)]
    batch = _batches(1)[0]
    ensemble = torch.func.vmap(step, in_dims=(0, None), randomness="different")(
        fmm.tree.stack(states), batch
    )[0]
    for i, s in enumerate(states):
        alone, _ = step(s, batch)
        assert _max_diff(fmm.tree.unstack(ensemble["params"])[i], alone["params"]) < 1e-5


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="engine"):
        make_train_step(loss_fn, OPT, engine="jax")
