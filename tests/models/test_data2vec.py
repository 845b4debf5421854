"""data2vec's laws: exact mask shares, an EMA teacher that is pure and gets no gradient,
a loss blind to unmasked positions, targets equal to a direct re-computation of the mean
of the normalised top-K layers, shapes per modality, and training that lowers the loss.

No parity test: no reference implementation is a target (TorchMultimodal has no data2vec).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import fmm
from fmm import optim, tree
from fmm.nn.towers import text, vit
from models import data2vec as D
from models.data2vec import INPUTS

TINY = {
    "image": D.data2vec_image_tiny,
    "text": D.data2vec_text_tiny,
    "audio": D.data2vec_audio_tiny,
}


def _batch(cfg, n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    k = fmm.random.key(seed)
    if cfg.modality == "text":
        ids = fmm.random.uniform(k, (n, 12)) * (cfg.vocab_size - 1)
        return {"tokens": ids.long()}
    return {INPUTS[cfg.modality]: fmm.random.normal(k, (n, *cfg.input_shape))}


@pytest.fixture(scope="module", params=sorted(TINY))
def setup(request):
    cfg = TINY[request.param]()
    params = D.init(cfg, fmm.random.key(0))
    # A teacher away from the student, so the EMA and the targets are not trivial.
    moved = tree.map(lambda x: x + 0.01 * torch.randn_like(x), params)
    return cfg, params, D.init_state(cfg, moved, fmm.random.key(1))


def test_shapes_per_modality(setup):
    cfg, params, state = setup
    batch = _batch(cfg)
    x = batch[INPUTS[cfg.modality]]
    value, metrics = D.loss(params, batch, cfg=cfg, key=fmm.random.key(2), state=state)
    assert value.shape == () and torch.isfinite(value) and value > 0
    assert sorted(metrics) == ["aux", "pred_var", "regression", "target_var"]
    positions = 12 if cfg.modality == "text" else cfg.patches
    assert D.targets(state["teacher"], x, cfg=cfg).shape == (2, positions, cfg.width)
    assert D.encode(params, x, cfg=cfg).shape == (2, positions + (cfg.modality != "text"), 64)
    assert D.features(params, x, cfg=cfg).shape == (2, cfg.width)


@pytest.mark.parametrize(
    "grid, ratio, block",
    [((8, 8), 0.6, (1, 1)), ((8, 8), 0.6, (2, 2)), ((14, 14), 0.6, (4, 4)), ((8, 4), 0.5, (2, 4)),
     ((64, 8), 0.5, (2, 8)), ((7, 5), 0.3, (3, 2))],
)  # fmt: skip
def test_masking_keeps_exactly_the_requested_share(grid, ratio, block):
    n = grid[0] * grid[1]
    mask = D.patch_mask(fmm.random.key(3), 16, grid, ratio, block=block)
    assert mask.dtype == torch.bool and mask.shape == (16, n)
    assert (mask.sum(1) == n - int(n * (1 - ratio))).all()
    assert torch.equal(mask, D.patch_mask(fmm.random.key(3), 16, grid, ratio, block=block))
    assert not torch.equal(mask, D.patch_mask(fmm.random.key(4), 16, grid, ratio, block=block))


def test_audio_masks_whole_time_spans():
    cfg = D.data2vec_audio_tiny()  # spans of 2 patch rows across every mel band
    rows = D.patch_mask(fmm.random.key(5), 32, cfg.grid, cfg.mask_ratio, block=cfg.mask_block)
    per_row = rows.view(32, *cfg.grid).sum(2)
    # Every row masked wholly or not at all, but the rows of the one block filled partly.
    partial = ((per_row > 0) & (per_row < cfg.grid[1])).sum(1)
    assert (partial <= cfg.mask_block[0]).all()


def test_text_masks_its_share_and_ignores_padding():
    cfg = D.data2vec_text_tiny()
    params = D.init(cfg, fmm.random.key(0))
    state = D.init_state(cfg, params)
    tokens = _batch(cfg, n=4)["tokens"]
    valid = torch.arange(12) < 9
    valid = valid.expand(4, 12)
    padded = torch.where(valid, tokens, (tokens + 7) % (cfg.vocab_size - 1))
    key = fmm.random.key(6)
    a, _ = D.loss(params, {"tokens": tokens, "valid": valid}, cfg=cfg, key=key, state=state)
    b, _ = D.loss(params, {"tokens": padded, "valid": valid}, cfg=cfg, key=key, state=state)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # The share: fmm.losses.mask_tokens' Bernoulli rate, over many tokens.
    big = fmm.random.uniform(fmm.random.key(7), (64, 32)) * 60
    masked, _ = fmm.losses.masked.mask_tokens(
        fmm.random.key(8), big.long(), rate=cfg.mask_ratio, mask_id=cfg.mask_id
    )
    assert abs((masked == cfg.mask_id).float().mean() - cfg.mask_ratio) < 0.03


def test_ema_update_is_pure_and_exact(setup):
    cfg, params, state = setup
    state = {**state, "step": torch.tensor(cfg.tau_steps // 2)}
    before = tree.map(torch.clone, state)
    p1, s1 = D.update_state(state, params, {}, cfg=cfg)
    _, s2 = D.update_state(state, params, {}, cfg=cfg)
    assert p1 is params
    for k, v in tree.flatten(before).items():
        assert torch.equal(v, tree.flatten(state)[k]), f"update_state mutated {k}"
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(s1), tree.leaves(s2)))
    d = (cfg.tau_start + cfg.tau_end) / 2
    assert D.ema_decay(cfg, state["step"]).item() == pytest.approx(d, abs=1e-7)
    flat, teacher = tree.flatten(params), tree.flatten(state["teacher"])
    for k, got in tree.flatten(s1["teacher"]).items():
        torch.testing.assert_close(got, d * teacher[k] + (1 - d) * flat[k], atol=1e-7, rtol=1e-6)
    assert s1["step"].item() == state["step"].item() + 1
    schedule = [D.ema_decay(cfg, torch.tensor(s)).item() for s in (0, cfg.tau_steps, 10**6)]
    assert schedule == pytest.approx([cfg.tau_start, cfg.tau_end, cfg.tau_end])


def test_the_teacher_receives_no_gradient(setup):
    cfg, params, state = setup
    live = tree.map(lambda x: x.detach().clone().requires_grad_(True), state["teacher"])
    student = tree.map(lambda x: x.detach().clone().requires_grad_(True), params)
    value, _ = D.loss(
        student, _batch(cfg), cfg=cfg, key=fmm.random.key(2), state={**state, "teacher": live}
    )
    grads = torch.autograd.grad(value, tree.leaves(live), allow_unused=True)
    assert all(g is None for g in grads)
    (head,) = torch.autograd.grad(value, [student["head"]["weight"]])
    assert head.abs().sum() > 0


def test_the_loss_ignores_unmasked_positions():
    pred, target = torch.randn(3, 10, 8), torch.randn(3, 10, 8)
    mask = torch.rand(3, 10) < 0.5
    noise = torch.randn_like(pred) * 5
    for beta in (0.0, 2.0):
        base = D.regression_loss(pred, target, mask, beta=beta)
        moved = D.regression_loss(pred + noise * ~mask[..., None], target, mask, beta=beta)
        assert torch.equal(base, moved)
        assert D.regression_loss(pred + noise * mask[..., None], target, mask, beta=beta) != base
    assert D.regression_loss(pred, target, torch.zeros(3, 10, dtype=torch.bool), beta=0) == 0


@pytest.mark.parametrize("modality", ["image", "text"])
def test_targets_are_the_mean_of_the_normalised_top_k_layers(modality):
    cfg = replace(TINY[modality](), top_k=3)
    teacher = D.init_state(cfg, D.init(cfg, fmm.random.key(0)))["teacher"]
    x = _batch(cfg)[INPUTS[modality]]
    want = []
    # Block l's output directly: the tower cut after l blocks, before any final norm.
    for depth in range(cfg.layers - cfg.top_k + 1, cfg.layers + 1):
        tower = replace(cfg.tower, transformer=replace(cfg.transformer, layers=depth))
        cut = {**teacher, "transformer": {"blocks": teacher["transformer"]["blocks"][:depth]}}
        if modality == "image":
            h = vit(cut, x, cfg=tower).hidden[:, 1:]
            h = (h - h.mean(1, keepdim=True)) / (
                h.var(1, unbiased=False, keepdim=True) + 1e-5
            ).sqrt()
        else:
            h = text(cut, x, cfg=tower).hidden
            h = (h - h.mean(2, keepdim=True)) / (
                h.var(2, unbiased=False, keepdim=True) + 1e-5
            ).sqrt()
        want.append(h)
    got = D.targets(teacher, x, cfg=cfg)
    torch.testing.assert_close(got, sum(want) / len(want), atol=1e-5, rtol=1e-5)


def test_a_few_training_steps_lower_the_loss():
    cfg = D.data2vec_image_tiny()
    params = D.init(cfg, fmm.random.key(0))
    state = D.init_state(cfg, params)
    # Smooth images (a 4² noise grid upsampled): masked patches have informative neighbours.
    grid = fmm.random.normal(fmm.random.key(7), (4, 3, 4, 4))
    batch = {"images": F.interpolate(grid, size=32, mode="bilinear", align_corners=False)}

    def held_out(p, s):
        keys = [fmm.random.key(100 + i) for i in range(2)]
        return sum(float(D.loss(p, batch, cfg=cfg, key=k, state=s, train=False)[0]) for k in keys)

    opt = optim.adamw(3e-3, weight_decay=0.0)
    opt_state, start = opt.init(params), held_out(params, state)
    names = list(tree.flatten(params))
    for step in range(8):
        live = tree.map(lambda x: x.detach().requires_grad_(True), params)
        value, metrics = D.loss(live, batch, cfg=cfg, key=fmm.random.key(step), state=state)
        grads = dict(zip(names, torch.autograd.grad(value, tree.leaves(live))))
        updates, opt_state = opt.update(tree.unflatten(grads), opt_state, params)
        params = optim.apply_updates(params, updates)
        params, state = D.update_state(state, params, metrics.pop("aux"), cfg=cfg)
    assert held_out(params, state) < 0.75 * start


def test_bad_input_is_refused_by_name():
    cfg = D.data2vec_image_tiny()
    params = D.init(cfg, fmm.random.key(0))
    state = D.init_state(cfg, params)
    images = _batch(cfg)["images"]
    with pytest.raises(ValueError, match="state="):
        D.loss(params, {"images": images}, cfg=cfg, key=fmm.random.key(0))
    with pytest.raises(ValueError, match="key="):
        D.loss(params, {"images": images}, cfg=cfg, state=state)
    with pytest.raises(ValueError, match=r"batch\['images'\]"):
        D.loss(params, {"images": images[:, :, :16]}, cfg=cfg, key=fmm.random.key(0), state=state)
    with pytest.raises(ValueError, match="state\\['teacher'\\]"):
        D.loss(
            params, {"images": images}, cfg=cfg, key=fmm.random.key(0),
            state={**state, "teacher": {k: v for k, v in state["teacher"].items() if k != "cls"}},
        )  # fmt: skip
    for bad in (dict(top_k=9), dict(modality="video"), dict(mask_ratio=1.0), dict(tau_end=0.5)):
        with pytest.raises(ValueError, match="Data2VecConfig"):
            replace(cfg, **bad)


def test_the_audio_loss_traces_as_one_graph():
    # The contract suite compiles the smallest preset's loss (text); the patch modalities
    # add the block mask's sorts and gathers and their own embeddings. Dynamo alone
    # (backend "eager") finds any graph break, without inductor's compile time.
    cfg = D.data2vec_audio_tiny()
    params = D.init(cfg, fmm.random.key(0))
    state = D.init_state(cfg, params)
    step = lambda p, b, k: D.loss(p, b, cfg=cfg, key=k, state=state)[0]
    fn = torch.compile(step, backend="eager", fullgraph=True)
    batch, key = _batch(cfg), fmm.random.key(11)
    torch.testing.assert_close(fn(params, batch, key), step(params, batch, key))
    torch._dynamo.reset()
