"""fmm.adapter: same names as the pytree, forward == pure apply, checkpointing == plain."""

import dataclasses
import functools
from pathlib import Path

import pytest
import torch

import fmm
from fmm import nn, optim
from fmm.adapter import Block, ModelAdapter, ParamTree, checkpointed_block
from fmm.step import init_state, make_train_step
from models import clip
from train import distributed as D

CFG = dataclasses.replace(
    clip.clip_tiny(vocab_size=13, context_length=6),
    image_size=8,
    patch_size=4,
    image_width=12,
    image_layers=2,
    image_heads=3,
    text_width=9,
    text_layers=2,
    text_heads=3,
    embed_dim=7,
)
# Dropout on both the residual branches and the attention weights: recompute must redraw
# exactly the same masks from the explicit keys.
DROP = nn.TransformerConfig(width=10, layers=3, heads=2, dropout=0.3, attn_dropout=0.2)


@pytest.fixture(scope="module")
def params():
    return clip.init(CFG, fmm.random.key(0), dtype=torch.float64)


def _batch(n=5):
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64),
        "tokens": torch.randint(1, 13, (n, 6), generator=g),
    }


def test_state_dict_names_equal_flattened_names(params):
    model = ModelAdapter(params, functools.partial(clip.apply, cfg=CFG))
    flat = fmm.tree.flatten(params)
    assert model.state_dict().keys() == flat.keys()
    assert "image.transformer.blocks.1.attn.qkv.weight" in model.state_dict()
    for name, value in model.state_dict().items():
        assert value.data_ptr() == flat[name].data_ptr()  # registered, not copied
    assert fmm.tree.flatten(model.tree()).keys() == flat.keys()
    assert len(model.block_modules()) == CFG.image_layers + CFG.text_layers
    assert all(isinstance(b, Block) for b in model.image.transformer.blocks.children())


def test_param_tree_round_trips_lists_and_integer_leaves():
    tree = {"w": torch.ones(2, 3), "ids": torch.arange(4), "stack": [{"b": torch.zeros(3)}] * 2}
    pt = ParamTree(tree)
    assert sorted(pt.state_dict()) == ["ids", "stack.0.b", "stack.1.b", "w"]
    back = pt.tree()
    assert isinstance(back["stack"], list) and back["stack"][1]["b"].shape == (3,)
    assert not pt.ids.requires_grad and pt.w.requires_grad


def test_adapter_forward_equals_pure_apply(params):
    b = _batch()
    want = clip.apply(params, b["images"], b["tokens"], cfg=CFG)
    for ac in (False, True):
        model = ModelAdapter(params, functools.partial(clip.apply, cfg=CFG), checkpoint=ac)
        got = model(b["images"], b["tokens"])
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_adapter_backward_equals_pure_grad_with_and_without_checkpointing(params):
    b = _batch()
    live = fmm.tree.map(lambda x: x.detach().requires_grad_(True), params)
    want = torch.autograd.grad(clip.loss(live, b, cfg=CFG)[0], fmm.tree.leaves(live))
    want = dict(zip(fmm.tree.flatten(live), want))
    for ac in (False, True):
        model = ModelAdapter(params, functools.partial(clip.loss, cfg=CFG), checkpoint=ac)
        model(b)[0].backward()
        got = {k: p.grad for k, p in fmm.tree.flatten(model.tree()).items()}
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-12)


def _dropout_grads(block_fn, *, use_backward, seed=9):
    params = nn.init_transformer(DROP, fmm.random.key(3))
    x = torch.randn(4, 7, DROP.width, generator=torch.Generator().manual_seed(1))
    key = fmm.random.key(seed)
    if use_backward:
        model = ModelAdapter(
            params,
            lambda p, x, block_fn: nn.transformer(
                p, x, cfg=DROP, key=key, train=True, block_fn=block_fn
            ),
            checkpoint=block_fn is checkpointed_block,
        )
        model(x).square().mean().backward()
        return [p.grad for p in fmm.tree.leaves(model.tree())]
    live = fmm.tree.map(lambda t: t.requires_grad_(True), params)
    y = nn.transformer(live, x, cfg=DROP, key=key, train=True, block_fn=block_fn)
    return torch.autograd.grad(y.square().mean(), fmm.tree.leaves(live))


@pytest.mark.parametrize("use_backward", [False, True], ids=["autograd.grad", "backward"])
def test_checkpointing_with_dropout_gives_the_same_grads(use_backward):
    plain = _dropout_grads(None, use_backward=use_backward)
    ckpt = _dropout_grads(checkpointed_block, use_backward=use_backward)
    assert (
        len(plain)
        == len(ckpt)
        == len(fmm.tree.leaves(nn.init_transformer(DROP, fmm.random.key(3))))
    )
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)
    # The masks are live: another dropout key gives other grads.
    other = _dropout_grads(None, use_backward=use_backward, seed=10)
    assert not all(torch.equal(a, b) for a, b in zip(plain, other))


def _clip_loss(p, b, k, *, block_fn):
    return clip.loss(p, b, cfg=CFG, block_fn=block_fn)


def test_checkpointed_blocks_compose_with_the_default_train_step(params):
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2))
    batch = _batch()
    out = []
    for block_fn in (None, checkpointed_block):
        loss_fn = functools.partial(_clip_loss, block_fn=block_fn)
        step = make_train_step(loss_fn, opt)
        state, metrics = step(init_state(params, opt, key=fmm.random.key(1)), batch)
        out.append((state["params"], metrics["loss"]))
    assert torch.equal(out[0][1], out[1][1])
    for a, b in zip(fmm.tree.leaves(out[0][0]), fmm.tree.leaves(out[1][0])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_single_process_module_step_equals_the_pure_step(params):
    """train.distributed.make_step without a process group == fmm.step with clipping."""
    sched = optim.cosine_schedule(1e-2, total_steps=5, warmup_steps=1)
    pure_opt = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(sched, weight_decay=0.1))
    pure = make_train_step(lambda p, b, k: clip.loss(p, b, cfg=CFG), pure_opt)
    state = init_state(params, pure_opt, key=fmm.random.key(1))
    adapter = ModelAdapter(fmm.tree.map(torch.clone, params), functools.partial(clip.loss, cfg=CFG))
    adamw = optim.adamw(sched, weight_decay=0.1)
    step = D.make_step(adapter, adapter, adamw, loss_call=lambda m, b, k: m(b), mode=None,
                       max_grad_norm=0.5)  # fmt: skip
    mstate = {"opt_state": adamw.init(adapter.tree()), "step": torch.zeros((), dtype=torch.int64),
              "key": fmm.random.key(1)}  # fmt: skip
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        b = {"images": torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64),
             "tokens": torch.randint(1, 13, (4, 6), generator=g)}  # fmt: skip
        state, m1 = pure(state, b)
        mstate, m2 = step(mstate, b)
        assert float(m1["grad_norm"]) > 0.5  # clipping is active
        torch.testing.assert_close(m1["loss"], m2["loss"], rtol=0, atol=1e-12)
    for a, b in zip(fmm.tree.leaves(state["params"]), fmm.tree.leaves(adapter.tree())):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-10)


def test_bad_input_is_a_clear_error(params):
    with pytest.raises(TypeError, match=r"'a.b'.*got str"):
        ParamTree({"a": {"b": "not a tensor"}})
    with pytest.raises(ValueError, match=r"without '\.'.*'x.y'"):
        ParamTree({"x.y": torch.zeros(1)})
    with pytest.raises(TypeError, match="fn must be callable"):
        ModelAdapter(params, fn=3)
    model = ModelAdapter(params, functools.partial(clip.loss, cfg=CFG))
    with pytest.raises(ValueError, match="mode must be one of"):
        D.wrap(model, "zero3")
    with pytest.raises(ValueError, match="precision must be one of"):
        D.wrap(model, "ddp", precision="fp8")
    with pytest.raises(TypeError, match="ModelAdapter"):
        D.wrap(torch.nn.Linear(2, 2), "ddp")
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        D.make_step(model, model, optim.sgd(0.1), loss_call=None, mode=None, max_grad_norm=0)


def test_setup_outside_torchrun_says_how_to_launch(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        D.setup("cpu")


def test_gather_without_a_process_group_is_the_identity():
    x = torch.randn(3, 4)
    y, offset = D.all_gather_with_grad(x)
    assert y is x and offset == 0


def test_the_adapter_snippet_of_the_scale_guide_runs():
    text = (Path(__file__).resolve().parents[2] / "docs/scale.md").read_text()
    block = text.split("```python\n")[1].split("```")[0]
    assert "ModelAdapter" in block
    exec(compile(block, "docs/scale.md", "exec"), {})


def test_cached_decoding_entry_points_equal_fmm_decoding():
    from fmm import decoding
    from models import gpt

    cfg = gpt.gpt_tiny(vocab_size=17, context_length=12)
    params = gpt.init(cfg, fmm.random.key(0))
    model = ModelAdapter(params, functools.partial(gpt.apply, cfg=cfg))
    prompt = torch.randint(0, 17, (2, 5), generator=torch.Generator().manual_seed(0))
    cache = decoding.init_cache(cfg, 2, 12)
    want, want_cache = decoding.prefill(params, prompt, cache, cfg=cfg)
    got, got_cache = model.prefill(prompt, cache, cfg=cfg)
    assert torch.equal(got, want)
    token = want[:, -1].argmax(-1)
    want, _ = decoding.decode_step(params, token, want_cache, cfg=cfg)
    got, _ = model.decode_step(token, got_cache, cfg=cfg)
    assert torch.equal(got, want)
