"""Frozen leaves (``Training.trainable``, LiT's locked towers) in both trainers: a frozen
leaf keeps every bit through AdamW with weight decay, gets no gradient (the pure step does
not even hand it to autograd) and does not count in the clipped gradient norm; the others
train; a checkpoint of a frozen run resumes bitwise, on either path."""

import dataclasses
import functools

import pytest
import torch

import fmm
from models import clip
from train import distributed as dist_
from train.data import WordTokenizer, WorldConfig
from train.loop.engine import (
    Frozen,
    ModuleTrainer,
    PureTrainer,
    Training,
    base_keys,
    optimizer_for,
)
from train.recipes.clip import captioned_scenes
from train.sharded import load_sharded, save_sharded

WORLD = WorldConfig()
TOKENIZER = WordTokenizer.for_world(WORLD)
CFG = clip.clip_tiny(vocab_size=TOKENIZER.vocab_size)
LOCKED = "image."  # LiT: the image tower is locked, the text tower and temperature train


def _trains(name: str) -> bool:
    return not name.startswith(LOCKED)


def _batch(i: int) -> dict:
    gen = torch.Generator().manual_seed(100 + i)
    return captioned_scenes(WORLD, TOKENIZER, CFG.context_length, gen, 4)


def _training(family=clip.FAMILY, trainable=_trains) -> Training:
    keys = base_keys(0)
    params = clip.init(CFG, keys["init"])
    optimizer = optimizer_for(lr=1e-2, steps=10, warmup=0, weight_decay=0.1)
    return Training(family, CFG, params, None, optimizer, keys["step"], trainable=trainable)


def _pure(t, compiled=False):
    return PureTrainer(t, compile=compiled)


def _module(t):
    return ModuleTrainer(t, env=dist_.Env(0, 1, torch.device("cpu")), mode=None, ac=False,
                         precision="fp32")  # fmt: skip


def _compiled(t, monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real, backend="aot_eager"))
    torch._dynamo.reset()
    return _pure(t, compiled=True)


def _flat(params) -> dict:
    return {k: v.detach().clone() for k, v in fmm.tree.flatten(params).items()}


@pytest.mark.parametrize("path", ["pure", "compiled", "module"])
def test_frozen_leaves_keep_every_bit_and_the_others_train(path, monkeypatch):
    t = _training()
    before = _flat(t.params)
    make = {"pure": _pure, "module": _module}.get(path) or functools.partial(
        _compiled, monkeypatch=monkeypatch
    )
    trainer = make(t)
    for i in range(3):
        metrics = trainer.step(_batch(i))
    after = _flat(trainer.params())
    frozen = [k for k in before if not _trains(k)]
    trained = [k for k in before if _trains(k)]
    assert frozen and trained and after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    moved = [k for k in trained if not torch.equal(before[k], after[k])]
    assert moved == trained
    # AdamW's moments cover the trainable leaves only, under their usual names
    mu = fmm.tree.flatten(trainer.checkpoint_tree()["opt_state"]["mu"])
    assert sorted(mu) == sorted(trained)
    assert torch.isfinite(metrics["loss"])
    torch._dynamo.reset()


def test_the_gradient_norm_counts_only_the_trainable_leaves():
    t = _training()
    batch = _batch(0)
    step_key = fmm.random.fold_in(t.key, torch.zeros((), dtype=torch.int64))
    leaves = {k: v.detach().requires_grad_(True) for k, v in fmm.tree.flatten(t.params).items()}
    loss, _ = clip.loss(fmm.tree.unflatten(leaves), batch, cfg=CFG, key=step_key, train=True)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    want = fmm.optim.global_norm([g for k, g in grads.items() if _trains(k)])
    everything = fmm.optim.global_norm(list(grads.values()))
    assert everything > want * 1.01  # the locked tower's gradient is not small: it matters
    for make in (_pure, _module):
        got = make(_training()).step(batch)["grad_norm"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_the_pure_step_hands_autograd_no_frozen_leaf_and_the_module_path_marks_them():
    seen = []

    def spy(params, batch, **kwargs):
        seen.append((params["image"]["patch"]["weight"].requires_grad,
                     params["text"]["token"]["weight"].requires_grad))  # fmt: skip
        return clip.loss(params, batch, **kwargs)

    t = _training(family=dataclasses.replace(clip.FAMILY, loss=spy))
    _pure(t).step(_batch(0))
    assert seen == [(False, True)]  # the image tower is a constant: no graph recorded for it
    module = _module(_training())
    grads = {k: p.requires_grad for k, p in module.adapter.named_parameters()}
    assert grads == {k: _trains(k) for k in grads}


def test_a_frozen_run_resumes_bitwise_on_either_path(tmp_path):
    straight = _pure(_training())
    for i in range(4):
        straight.step(_batch(i))
    for first, then in ((_pure, _pure), (_module, _pure), (_pure, _module)):
        root = tmp_path / f"{first.__name__}-{then.__name__}"
        half = first(_training())
        for i in range(2):
            half.step(_batch(i))
        save_sharded(root, 2, half.checkpoint_tree())
        resumed = then(_training())
        step, _ = load_sharded(root, resumed.checkpoint_tree())
        assert step == 2
        for i in range(2, 4):
            resumed.step(_batch(i))
        want, got = _flat(straight.params()), _flat(resumed.params())
        same = [k for k in want if torch.equal(want[k], got[k])]
        if first is then:  # the same path: every bit
            assert same == list(want)
        else:  # across paths: the module step sums in another order
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
            assert all(torch.equal(want[k], got[k]) for k in want if not _trains(k))


def test_frozen_parts_join_back_and_all_frozen_is_refused():
    params = clip.init(CFG, fmm.random.key(1))
    split = Frozen(params, lambda name: ".blocks.1." in name or name == "logit_scale")
    train, frozen = split.part(params, True), split.part(params, False)
    assert sorted(fmm.tree.flatten(train)) == sorted(k for k in split.trains if split.trains[k])
    whole = fmm.tree.flatten(split.join(train, frozen))
    assert list(whole) == list(fmm.tree.flatten(params))
    assert all(whole[k] is v for k, v in fmm.tree.flatten(params).items())
    with pytest.raises(ValueError, match="every parameter is frozen"):
        Frozen(params, lambda name: False)
