"""The pure train step: eager == compiled, no recompiles, purity, both gradient engines."""

import dataclasses

import pytest
import torch
import torch._dynamo

import fmm
from fmm import optim
from fmm.step import init_state, make_train_step
from models import clip

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


def test_max_grad_norm_clips_as_clip_by_global_norm_before_the_optimizer():
    adamw = optim.adamw(
        optim.cosine_schedule(1e-2, total_steps=20, warmup_steps=2), weight_decay=0.1
    )  # OPT without its clipping
    chained = make_train_step(loss_fn, OPT)
    clipped = make_train_step(loss_fn, adamw, max_grad_norm=1.0)
    a = _state()
    b = init_state(clip.init(CFG, fmm.random.key(0)), adamw, key=fmm.random.key(1))
    for batch in _batches(3):
        a, m_a = chained(a, batch)
        b, m_b = clipped(b, batch)
    assert m_b["grad_norm"] > 1.0  # clipping was active
    assert torch.equal(m_a["grad_norm"], m_b["grad_norm"])
    assert all(torch.equal(x, y) for x, y in zip(fmm.tree.leaves(a["params"]), fmm.tree.leaves(b["params"])))  # fmt: skip


def test_model_state_is_read_by_the_loss_and_updated_with_the_new_params():
    # A family whose train state is an EMA of its params, pulling the params toward it.
    def state_loss(p, batch, key, *, state):
        value, metrics = clip.loss(p, batch, cfg=CFG)
        pull = sum(((a - b) ** 2).sum() for a, b in zip(fmm.tree.leaves(p), fmm.tree.leaves(state)))
        return value + 1e-3 * pull, {**metrics, "aux": {"contrastive": value.detach().reshape(1)}}

    calls = []

    def update(state, params, aux, key):
        calls.append((params, aux, key))
        return params, fmm.tree.map(lambda s, q: 0.5 * s + 0.5 * q, state, params)

    adamw = optim.adamw(1e-2)
    params = clip.init(CFG, fmm.random.key(0))
    ema = fmm.tree.map(lambda x: x + 1.0, params)
    s0 = init_state(params, adamw, key=fmm.random.key(1), model_state=ema)
    before = fmm.tree.map(torch.clone, ema)
    batch = _batches(1)[0]
    s1, metrics = make_train_step(state_loss, adamw, update_state=update)(s0, batch)
    contrastive, _ = clip.loss(params, batch, cfg=CFG)
    pull = sum(((a - b) ** 2).sum() for a, b in zip(fmm.tree.leaves(params), fmm.tree.leaves(ema)))
    torch.testing.assert_close(metrics["loss"], contrastive + 1e-3 * pull)  # the loss read it
    assert "aux" not in metrics  # taken for the update
    ((seen, aux, key),) = calls
    assert seen is s1["params"]  # the params after the optimizer step
    assert torch.equal(aux["contrastive"], contrastive.detach().reshape(1))
    assert torch.equal(key, fmm.random.fold_in(fmm.random.fold_in(s0["key"], 0), "state"))
    want = fmm.tree.map(lambda s, q: 0.5 * s + 0.5 * q, before, s1["params"])
    assert _max_diff(s1["model_state"], want) == 0.0
    assert _max_diff(s0["model_state"], before) == 0.0  # pure: the old state is untouched
