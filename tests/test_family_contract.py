"""One contract suite over ``models.FAMILIES``: what every family promises the machinery.

A family is tested here by being registered: its smallest preset is built, a batch is drawn
from its declared fields (``models.family.example_batch``), and the same laws run for all:
meta-device init, init pure in the key, the loss on its declared batch, one graph under
``torch.compile(fullgraph=True)`` without recompiles, the adapter (FSDP2 / activation
checkpointing) equal to the pure loss, checkpointed grads bitwise equal to plain ones,
batch independence of its embeddings, golden param specs and a numeric golden.

Compiling uses the ``aot_eager`` backend: graph breaks and recompiles are dynamo's (and
AOT autograd's) business, which inductor's code generation would only make slower to test;
``tests/fmm/test_step.py`` compiles a whole train step with inductor.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch._dynamo

import fmm
import models
from fmm.adapter import ModelAdapter
from models.family import check_batch, example_batch

GOLDEN = Path(__file__).parent / "golden"
NUMERIC = GOLDEN / "numeric.json"
FAMILIES = {family.name: family for family in models.FAMILIES}


def _meta(family, cfg):
    return family.init(cfg, fmm.random.key(0).to("meta"))


@functools.cache
def _size(name: str) -> int:
    """Params of preset ``name``, counted on the meta device (tens of ms even for
    ``flava_10b``)."""
    cfg = models.get_config(name)
    return fmm.tree.count(_meta(models.family_of(cfg), cfg))


@functools.cache
def smallest(name: str) -> str:
    """The family's preset with the fewest params: what the laws run on."""
    family = FAMILIES[name]
    return min(family.presets, key=_size)


class Case:
    """A family's smallest preset, its params, state and an example batch."""

    def __init__(self, name: str, preset: str | None = None, cfg=None):
        """``name``'s smallest preset, or ``preset`` with ``cfg`` (that preset narrowed, so
        a family test can run the laws below on another of its presets quickly)."""
        self.family = family = FAMILIES[name]
        self.preset = preset or smallest(name)
        self.cfg = cfg = cfg or family.presets[self.preset]()
        self.params = family.init(cfg, fmm.random.key(0))
        self.state = (
            family.init_state(cfg, self.params, fmm.random.key(1))
            if family.init_state is not None
            else None
        )
        self.batch = example_batch(family.batch(cfg), fmm.random.key(2))

    def loss(self, params, batch, key, *, block_fn=None, train=True):
        extras = {"state": self.state} if "state" in self.family.loss_extras else {}
        return self.family.loss(
            params, batch, cfg=self.cfg, key=key, train=train, block_fn=block_fn, **extras
        )


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request) -> Case:
    return Case(request.param)


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "aux"}


def test_every_preset_builds_a_config_of_its_family():
    for family in FAMILIES.values():
        for name, build in family.presets.items():
            cfg = build()
            assert isinstance(cfg, family.config), name
            assert models.family_of(cfg) is family
            assert models.get_config(name) == cfg


def test_meta_init_gives_the_shapes_of_real_init_and_allocates_nothing(case):
    meta = _meta(case.family, case.cfg)
    assert all(leaf.device.type == "meta" for leaf in fmm.tree.leaves(meta))
    real = {k: (v.shape, v.dtype) for k, v in fmm.tree.flatten(case.params).items()}
    assert {k: (v.shape, v.dtype) for k, v in fmm.tree.flatten(meta).items()} == real


def test_init_is_a_pure_function_of_the_key(case):
    again = case.family.init(case.cfg, fmm.random.key(0))
    other = case.family.init(case.cfg, fmm.random.key(7))
    flat, flat_again, flat_other = (fmm.tree.flatten(t) for t in (case.params, again, other))
    assert all(torch.equal(flat[k], flat_again[k]) for k in flat)
    assert any(not torch.equal(flat[k], flat_other[k]) for k in flat)


def test_the_loss_runs_on_its_declared_batch_and_returns_scalar_metrics(case):
    check_batch(case.family.batch(case.cfg), case.batch, where=f"{case.preset} example")
    loss, metrics = case.loss(case.params, case.batch, fmm.random.key(3))
    assert loss.ndim == 0 and torch.isfinite(loss)
    for name, value in _scalars(metrics).items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0, name
        assert not value.requires_grad, name
    assert ("aux" in metrics) == (case.family.update_state is not None)


def test_a_batch_without_a_declared_field_is_refused_by_name(case):
    fields = case.family.batch(case.cfg)
    name = next(k for k, f in fields.items() if not f.optional)
    spoiled = {k: v for k, v in case.batch.items() if k != name}
    with pytest.raises(ValueError, match=name):
        check_batch(fields, spoiled, where="source")


def test_the_loss_compiles_as_one_graph_and_does_not_recompile(case):
    torch._dynamo.reset()
    compiles = []

    def backend(gm, inputs):
        compiles.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    fn = torch.compile(lambda p, b, k: case.loss(p, b, k), backend=backend, fullgraph=True)
    fields = case.family.batch(case.cfg)
    for seed in (2, 5):
        batch, key = example_batch(fields, fmm.random.key(seed)), fmm.random.key(seed + 1)
        got, _ = fn(case.params, batch, key)
        want, _ = case.loss(case.params, batch, key)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(compiles) == 1, f"{case.preset}: {len(compiles)} graphs for two steps"
    torch._dynamo.reset()


def _grads(loss: torch.Tensor, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    loss.backward()
    return {k: p.grad for k, p in module.named_parameters() if p.grad is not None}


def test_the_adapter_equals_the_pure_loss_and_checkpointing_changes_no_grad_bit(case):
    key = fmm.random.key(4)
    fn = lambda p, b, *, block_fn: case.loss(p, b, key, block_fn=block_fn)
    want, _ = case.loss(case.params, case.batch, key)
    grads = {}
    for ac in (False, True):
        model = ModelAdapter(fmm.tree.map(torch.clone, case.params), fn, checkpoint=ac)
        assert set(model.state_dict()) == set(fmm.tree.flatten(case.params))
        ran = set()
        for i, block in enumerate(model.block_modules()):
            block.register_forward_pre_hook(lambda *_, i=i, ran=ran: ran.add(i))
        got, _ = model(case.batch)
        # block_fn reached every stack: each block ran as its own module (FSDP2's unit).
        assert ran == set(range(len(model.block_modules()))), f"{case.preset}: blocks bypassed"
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        grads[ac] = _grads(got, model)
    assert grads[False].keys() == grads[True].keys()
    for k in grads[False]:
        assert torch.equal(grads[False][k], grads[True][k]), k


def test_embeddings_do_not_depend_on_the_rest_of_the_batch(case):
    serving = case.family.serving
    if serving is None:
        pytest.skip(f"{case.family.name} serves no embeddings")
    cfg, params = case.cfg, case.params
    inputs = []
    if serving.embed_image is not None:
        images = torch.rand(3, *serving.image_shape(cfg))
        inputs.append((serving.embed_image, images))
    if serving.embed_text is not None:
        tokens = next(v for k, v in case.batch.items() if v.dtype == torch.int64 and v.ndim == 2)
        inputs.append((serving.embed_text, tokens))
    for embed, x in inputs:
        whole = embed(params, x, cfg=cfg)
        for i in range(x.shape[0]):
            torch.testing.assert_close(embed(params, x[i : i + 1], cfg=cfg)[0], whole[i])


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_golden_param_spec(name):
    cfg = models.get_config(name)
    spec = {
        k: f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
        for k, v in fmm.tree.flatten(_meta(models.family_of(cfg), cfg)).items()
    }
    path = GOLDEN / f"{name}.json"
    assert path.is_file(), (
        f"no golden spec for {name}: run python tests/scripts/make_golden.py {name}"
    )
    assert spec == json.loads(path.read_text()), (
        f"{name}'s params changed; if deliberate, run python tests/scripts/make_golden.py {name}"
    )


def test_numeric_golden(case):
    """The loss at fixed keys: fmm's counter-based keys make init and the batch portable,
    so a changed value means changed math (within float32 rounding across CPUs)."""
    loss, _ = case.loss(case.params, case.batch, fmm.random.key(3))
    want = json.loads(NUMERIC.read_text())[case.family.name]
    assert want["preset"] == case.preset
    torch.testing.assert_close(loss, torch.tensor(want["loss"]), atol=1e-4, rtol=1e-4)


def test_stateful_families_update_their_state_purely(case):
    family = case.family
    if family.update_state is None:
        pytest.skip(f"{family.name} has no train state")
    _, metrics = case.loss(case.params, case.batch, fmm.random.key(3))
    before = fmm.tree.map(torch.clone, case.state)
    params, state = family.update_state(
        case.state, case.params, metrics["aux"], cfg=case.cfg, key=fmm.random.key(5)
    )
    flat, flat_before = fmm.tree.flatten(case.state), fmm.tree.flatten(before)
    assert all(torch.equal(flat[k], flat_before[k]) for k in flat), "update_state mutated state"
    assert fmm.tree.flatten(state).keys() == flat.keys()
    assert fmm.tree.flatten(params).keys() == fmm.tree.flatten(case.params).keys()
