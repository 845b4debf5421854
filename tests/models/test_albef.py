"""ALBEF's laws: pure momentum/queue state, loss laws, hard negatives without host syncs,
retrieval and VQA heads, errors. Parity with TorchMultimodal: test_albef_convert.py."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fmm
from models import albef as A
from models.bert import BertConfig

W, HEADS, MLP, VOCAB = 24, 3, 40, 50
TEXT = BertConfig(
    vocab_size=VOCAB, width=W, layers=2, heads=HEADS, mlp_dim=MLP, max_positions=16,
    dropout=0.0, attn_dropout=0.0, pooler=False, mask_id=1,
)  # fmt: skip
CFG = A.ALBEFConfig(
    image_size=20, patch_size=5, image_width=W, image_layers=2, image_heads=HEADS,
    image_mlp_dim=MLP, text=TEXT, fusion_layers=2, embed_dim=8, queue_size=12, num_answers=5,
)  # fmt: skip


@pytest.fixture(scope="module")
def params():
    return A.init(CFG, fmm.random.key(0))


def inputs(b=3, s=9, seed=0):
    """``images [b, 3, 20, 20]``, ``ids`` and ``mask [b, s]``, row 1 padded after 6 tokens."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, 20, 20, generator=g)
    ids = torch.randint(1, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    return images, ids, mask


def test_momentum_update_is_a_pure_ema_that_leaves_the_old_state_untouched(params):
    momentum = A.init_momentum(params)
    moved = fmm.tree.map(lambda x: x + 1.0, params)
    before = fmm.tree.map(torch.clone, momentum)
    new = A.momentum_update(momentum, moved, m=0.9)
    for k, v in fmm.tree.flatten(momentum).items():
        assert torch.equal(v, fmm.tree.flatten(before)[k])  # old state untouched
        torch.testing.assert_close(fmm.tree.flatten(new)[k], v + 0.1)
    assert set(new) == set(A.MOMENTUM_PARTS)
    same = A.momentum_update(momentum, moved, m=1.0)
    assert all(torch.equal(a, b) for a, b in zip(fmm.tree.leaves(same), fmm.tree.leaves(momentum)))


def test_enqueue_wraps_around_and_leaves_the_old_queue_untouched():
    queue = A.init_queue(CFG, fmm.random.key(0))
    queue = {**queue, "ptr": torch.tensor(10)}
    before = fmm.tree.map(torch.clone, queue)
    feats = F.normalize(torch.randn(4, 8), dim=-1)
    new = A.enqueue(queue, feats, -feats, torch.tensor([7, 8, 9, 10]))
    assert all(torch.equal(queue[k], before[k]) for k in queue)
    assert new["ptr"].item() == 2
    torch.testing.assert_close(new["image"][[10, 11, 0, 1]], feats)
    torch.testing.assert_close(new["text"][[10, 11, 0, 1]], -feats)
    assert new["idx"].tolist() == [9, 10] + [-1] * 8 + [7, 8]
    assert torch.equal(new["image"][2:10], queue["image"][2:10])


def test_itc_loss_is_symmetric_finite_and_clip_at_alpha_zero():
    g = torch.Generator().manual_seed(0)
    s_i2t, s_t2i = torch.randn(5, 9, generator=g) * 50, torch.randn(5, 9, generator=g) * 50
    m_i2t, m_t2i = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    targets = A.positive_targets(
        torch.arange(5), torch.cat([torch.arange(5), torch.full((4,), -1)])
    )
    a = A.itc_loss(s_i2t, s_t2i, targets, sim_i2t_m=m_i2t, sim_t2i_m=m_t2i, alpha=0.4)
    b = A.itc_loss(s_t2i, s_i2t, targets, sim_i2t_m=m_t2i, sim_t2i_m=m_i2t, alpha=0.4)
    assert torch.isfinite(a) and torch.equal(a, b)
    labels = torch.arange(5)
    clip = 0.5 * (F.cross_entropy(s_i2t, labels) + F.cross_entropy(s_t2i, labels))
    torch.testing.assert_close(A.itc_loss(s_i2t, s_t2i, targets), clip)
    # A ramped (tensor) alpha is the same weight, read without a host sync.
    ramped = A.itc_loss(
        s_i2t, s_t2i, targets, sim_i2t_m=m_i2t, sim_t2i_m=m_t2i, alpha=torch.tensor(0.4)
    )
    torch.testing.assert_close(ramped, a)
    zero = A.itc_loss(
        s_i2t, s_t2i, targets, sim_i2t_m=m_i2t, sim_t2i_m=m_t2i, alpha=torch.tensor(0.0)
    )
    torch.testing.assert_close(zero, A.itc_loss(s_i2t, s_t2i, targets))
    # Distillation moves the loss toward the momentum model's soft targets.
    assert not torch.allclose(a, A.itc_loss(s_i2t, s_t2i, targets))


def test_positive_targets_share_mass_between_equal_ids():
    t = A.positive_targets(torch.tensor([3, 4]), torch.tensor([3, 4, 3, -1]))
    assert t.tolist() == [[0.5, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]]


def test_hard_negatives_follow_the_similarity_and_never_pick_an_equal_id():
    sim = torch.tensor([[0.0, 2.0, 0.0, -30.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4])
    idx = torch.tensor([0, 1, 2, 2])
    counts = torch.zeros(4, 4)
    for i in range(300):
        t, im = A.hard_negatives(sim, sim, idx, fmm.random.key(i))
        counts[torch.arange(4), t] += 1
        assert (idx[t] != idx).all() and (idx[im] != idx).all()
    freq = counts / 300
    want0 = (
        torch.tensor([0.0, 2.0, 0.0, -30.0])
        .masked_fill(torch.tensor([1, 0, 0, 0]).bool(), -1e9)
        .softmax(0)
    )
    torch.testing.assert_close(freq[0], want0, atol=0.08, rtol=0)
    # Rows 2 and 3 share an id, so each may only pick rows 0 or 1.
    assert counts[2, 2:].sum() == 0 and counts[3, 2:].sum() == 0


def test_hard_negatives_trace_as_one_graph_so_there_is_no_host_sync():
    # fullgraph=True fails on .item()/.tolist() or a Python branch on a tensor value.
    f = torch.compile(A.hard_negatives, fullgraph=True, backend="eager")
    sim = torch.randn(6, 6)
    idx = torch.tensor([0, 1, 2, 2, 4, 5])
    got = f(sim, sim.T, idx, fmm.random.key(3))
    want = A.hard_negatives(sim, sim.T, idx, fmm.random.key(3))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_batch_of_one_id_falls_back_to_any_other_row():
    t, im = A.hard_negatives(
        torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), fmm.random.key(0)
    )
    assert (t != torch.arange(3)).all() and (im != torch.arange(3)).all()


def _pretrain_batch(b=4):
    images, ids, mask = inputs(b=b, s=9, seed=1)
    ids[:, 0] = 2
    return dict(images=images, tokens=ids, attention_mask=mask.bool(), idx=torch.arange(b))


def test_pretraining_loss_is_finite_and_reaches_every_trained_part(params):
    batch, state = _pretrain_batch(), A.init_state(CFG, params, fmm.random.key(5))
    fn = lambda p: A.loss(p, batch, cfg=CFG, key=fmm.random.key(0), state=state)
    grads = torch.func.grad(lambda p: fn(p)[0])(params)
    loss, metrics = fn(params)
    assert torch.isfinite(loss) and set(metrics) >= {"itc", "itm", "mlm", "itm_accuracy", "aux"}
    torch.testing.assert_close(loss, metrics["itc"] + metrics["itm"] + metrics["mlm"])
    parts = ("image", "text", "fusion", "vision_proj", "text_proj", "log_temp", "itm_head",
             "mlm_head")  # fmt: skip
    for part in parts:
        norm = sum(g.abs().sum() for g in fmm.tree.leaves(grads[part]))
        assert torch.isfinite(norm) and norm > 0, part
    # The momentum features in aux are the momentum encoders' own embeddings of the batch.
    want = A.momentum_features(
        state["momentum"], batch["images"], batch["tokens"], cfg=CFG,
        attention_mask=batch["attention_mask"],
    )  # fmt: skip
    torch.testing.assert_close(metrics["aux"]["image_feat_m"], want[0])
    torch.testing.assert_close(metrics["aux"]["text_feat_m"], want[1])
    assert torch.equal(metrics["aux"]["idx"], batch["idx"])


def test_the_loss_runs_every_stack_through_block_fn_the_momentum_encoders_included(params):
    batch, state = _pretrain_batch(), A.init_state(CFG, params, fmm.random.key(5))
    ran = []

    def block_fn(block_params, x, **kwargs):
        ran.append(id(block_params))
        return fmm.nn.block(block_params, x, **kwargs)

    run = lambda **kw: A.loss(params, batch, cfg=CFG, key=fmm.random.key(0), state=state, **kw)
    torch.testing.assert_close(run(block_fn=block_fn)[0], run()[0])
    ids = lambda tree, part: [
        id(b) for b in (tree[part].get("transformer") or tree[part])["blocks"]
    ]
    p, m = params, state["momentum"]
    # image, text, the momentum copies, fused positives, negatives, MLM text, MLM fused
    assert ran == (
        ids(p, "image") + ids(p, "text") + ids(m, "image") + ids(m, "text")
        + 2 * ids(p, "fusion") + ids(p, "text") + ids(p, "fusion")
    )  # fmt: skip


def _sgd(params, grads, lr=0.5):
    return fmm.tree.map(lambda p, g: (p - lr * g).detach(), params, grads)


def test_updating_the_state_after_the_step_gives_the_sequence_of_moving_momentum_first():
    """The recipe's old step moved the momentum encoders toward the current params, then
    took the gradient step with their features and enqueued them. The family's loop takes
    the step first and moves the momentum toward the new params after it. From momentum
    encoders that copy the params, both give the same losses, params and queues.

    In float64: the two orders round differently, and four steps at lr 0.5 grow float32's
    rounding to 1.2e-5 on an AMD EPYC's kernels, past assert_close's float32 tolerance."""
    cfg = A.with_answers(CFG, 0)
    params = A.init(cfg, fmm.random.key(0), dtype=torch.float64)
    grad = lambda p, b, k, st: torch.func.grad(
        lambda q: A.loss(q, b, cfg=cfg, key=k, state=st), has_aux=True
    )(p)
    batches = [_pretrain_batch() for _ in range(4)]
    for i, b in enumerate(batches):
        b["idx"] = b["idx"] + 4 * i  # new examples each step, so the queue matters
        b["images"] = b["images"].double()

    # the old order: momentum update, features, gradient step, enqueue
    old_p, state = params, A.init_state(cfg, params, fmm.random.key(5))
    old = []
    for i, b in enumerate(batches):
        moved = {**state, "momentum": A.momentum_update(state["momentum"], old_p, m=cfg.momentum)}
        g, metrics = grad(old_p, b, fmm.random.key(i), moved)
        old_p = _sgd(old_p, g)
        queue = A.enqueue(moved["queue"], *(metrics["aux"][k] for k in ("image_feat_m",
                          "text_feat_m", "idx")))  # fmt: skip
        state = {**moved, "queue": queue, "step": state["step"] + 1}
        old.append((metrics["itc"] + metrics["itm"] + metrics["mlm"], old_p, state))

    # the family's order: gradient step, then update_state toward the new params
    new_p, state = params, A.FAMILY.init_state(cfg, params, fmm.random.key(5))
    for i, b in enumerate(batches):
        g, metrics = grad(new_p, b, fmm.random.key(i), state)
        new_p = _sgd(new_p, g)
        new_p, state = A.FAMILY.update_state(state, new_p, metrics.pop("aux"), cfg=cfg, key=None)
        loss, old_params, old_state = old[i]
        torch.testing.assert_close(metrics["itc"] + metrics["itm"] + metrics["mlm"], loss)
        torch.testing.assert_close(new_p, old_params)
        torch.testing.assert_close(state["queue"], old_state["queue"])
        # ours moved toward the params after step i, which the old step does first at i + 1
        ahead = A.momentum_update(old_state["momentum"], old_params, m=cfg.momentum)
        torch.testing.assert_close(state["momentum"], ahead)
    assert int(state["step"]) == 4 and int(state["queue"]["ptr"]) == 16 % cfg.queue_size


def test_update_state_is_pure_and_a_vqa_step_only_counts(params):
    state = A.init_state(CFG, params, fmm.random.key(5))
    before = fmm.tree.map(torch.clone, state)
    _, metrics = A.loss(params, _pretrain_batch(), cfg=CFG, key=fmm.random.key(0), state=state)
    moved = fmm.tree.map(lambda x: x + 1.0 if x.is_floating_point() else x, params)
    same, new = A.update_state(state, moved, metrics["aux"], cfg=CFG)
    assert same is moved
    flat, flat_before = fmm.tree.flatten(state), fmm.tree.flatten(before)
    assert all(torch.equal(flat[k], flat_before[k]) for k in flat)  # old state untouched
    assert fmm.tree.flatten(new).keys() == flat.keys() and int(new["step"]) == 1
    assert int(new["queue"]["ptr"]) == 4
    _, counted = A.update_state(state, moved, {}, cfg=CFG)
    assert int(counted["step"]) == 1 and counted["momentum"] is state["momentum"]


def test_distillation_ramps_with_the_state_step(params):
    ramped = dataclasses.replace(CFG, alpha_ramp_steps=4)
    batch, state = _pretrain_batch(), A.init_state(CFG, params, fmm.random.key(5))
    itc = lambda cfg, step: A.loss(
        params, batch, cfg=cfg, key=fmm.random.key(0), state={**state, "step": torch.tensor(step)}
    )[1]["itc"]
    no_alpha = dataclasses.replace(CFG, alpha=0.0)
    half = dataclasses.replace(CFG, alpha=CFG.alpha / 2)
    torch.testing.assert_close(itc(ramped, 0), itc(no_alpha, 0))
    torch.testing.assert_close(itc(ramped, 2), itc(half, 2))
    torch.testing.assert_close(itc(ramped, 9), itc(CFG, 9))
    assert not torch.allclose(itc(CFG, 0), itc(no_alpha, 0))


def test_the_loss_compiles_as_one_graph_with_its_state(params):
    batch, state = _pretrain_batch(), A.init_state(CFG, params, fmm.random.key(5))
    fn = lambda p, b, k, st: A.loss(p, b, cfg=CFG, key=k, state=st)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    got, got_metrics = compiled(params, batch, fmm.random.key(3), state)
    want, want_metrics = fn(params, batch, fmm.random.key(3), state)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_metrics, want_metrics)


def test_batch_fields_name_each_tasksinputs():
    assert set(A.batch_fields(CFG)) == {"images", "tokens", "attention_mask", "idx"}
    vqa = A.batch_fields(CFG, task="vqa")
    assert set(vqa) == {"images", "tokens", "attention_mask", "answers"}
    assert vqa["answers"].high == CFG.num_answers and vqa["attention_mask"].optional
    with pytest.raises(ValueError, match="num_answers > 0"):
        A.batch_fields(A.with_answers(CFG, 0), task="vqa")
    with pytest.raises(ValueError, match="task must be one of"):
        A.batch_fields(CFG, task="retrieval")


def test_retrieval_embeddings_are_the_projected_class_tokens(params):
    images, ids, mask = inputs(b=3)
    img = A.embed_image(params, images, cfg=CFG)
    txt = A.embed_text(params, ids, cfg=CFG, attention_mask=mask)
    torch.testing.assert_close(
        img, A.image_embedding(params, A.encode_image(params, images, cfg=CFG))
    )
    want = A.text_embedding(params, A.encode_text(params, ids, cfg=CFG, attention_mask=mask))
    torch.testing.assert_close(txt, want)
    torch.testing.assert_close(A.logit_scale(params), 1 / A.temperature(params))
    assert A.FAMILY.serving.image_shape(CFG) == (3, 20, 20)


def test_outputs_are_independent_across_the_batch(params):
    images, ids, mask = inputs(b=3)
    full = A.apply(params, images, ids, cfg=CFG, attention_mask=mask)
    one = A.apply(params, images[2:], ids[2:], cfg=CFG, attention_mask=mask[2:])
    for k in full:
        torch.testing.assert_close(full[k][2:], one[k], atol=1e-5, rtol=1e-5)


def test_rank_texts_reranks_the_contrastive_top_k_by_itm(params):
    images, ids, mask = inputs(b=3)
    scores = A.rank_texts(params, images, ids, cfg=CFG, attention_mask=mask, k=2)
    sim = (
        A.image_embedding(params, A.encode_image(params, images, cfg=CFG))
        @ A.text_embedding(params, A.encode_text(params, ids, cfg=CFG, attention_mask=mask)).T
    )
    top = sim.topk(2, dim=1).indices
    reranked = torch.zeros_like(sim, dtype=torch.bool).scatter(1, top, True)
    assert ((scores[reranked] >= 0) & (scores[reranked] <= 1)).all()
    torch.testing.assert_close(scores[~reranked], sim[~reranked] - 1)
    fused = A.fuse(params, A.encode_text(params, ids, cfg=CFG, attention_mask=mask)[top[0, :1]],
                   A.encode_image(params, images[:1], cfg=CFG), cfg=CFG, attention_mask=mask[top[0, :1]])  # fmt: skip
    torch.testing.assert_close(scores[0, top[0, 0]], A.itm_logits(params, fused).softmax(-1)[0, 1])


def test_a_batch_with_answers_trains_the_answer_head(params):
    images, ids, mask = inputs(b=3)
    batch = dict(images=images, tokens=ids, attention_mask=mask, answers=torch.tensor([0, 4, 2]))
    loss, metrics = A.loss(params, batch, cfg=CFG)
    assert torch.isfinite(loss) and 0 <= metrics["vqa_accuracy"] <= 1 and metrics["aux"] == {}
    want = F.cross_entropy(
        A.vqa(params, images, ids, cfg=CFG, attention_mask=mask), batch["answers"]
    )
    torch.testing.assert_close(loss, want)
    g = torch.func.grad(lambda p: A.loss(p, batch, cfg=CFG)[0])(params)
    assert g["vqa_head"]["fc2"]["weight"].abs().sum() > 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda p: A.encode_image(p, torch.rand(2, 3, 16, 16), cfg=CFG),
            r"images must have shape \[batch, 3, 20, 20\]",
        ),
        (
            lambda p: A.apply(
                p, torch.rand(2, 3, 20, 20), torch.ones(3, 4, dtype=torch.long), cfg=CFG
            ),
            "same batch size",
        ),
        (lambda p: A.vqa_logits({}, torch.zeros(1, 2, W)), "no 'vqa_head'"),
        (
            lambda p: A.itc_similarities(
                torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(5, 7), torch.zeros(5, 7), 0.1
            ),
            "8-d but the candidates are 7-d",
        ),
        (
            lambda p: A.enqueue(
                A.init_queue(CFG, fmm.random.key(0)),
                torch.zeros(2, 7),
                torch.zeros(2, 7),
                torch.zeros(2),
            ),
            r"must both be \[batch, 8\]",
        ),
        (
            lambda p: A.hard_negatives(
                torch.zeros(3, 3), torch.zeros(3, 2), torch.zeros(3), fmm.random.key(0)
            ),
            r"sims \[3, 3\]",
        ),
        (lambda p: A.itm_loss(torch.zeros(2, 3), torch.zeros(2, 2)), r"\[pairs, 2\]"),
        (lambda p: A.init_momentum({"image": 1}), r"params lack \['text'"),
        (
            lambda p: A.ALBEFConfig(
                **{
                    **CFG.__dict__,
                    "text": BertConfig(vocab_size=5, width=8, layers=1, heads=2, mlp_dim=8),
                }
            ),
            "pooler=False",
        ),
    ],
)
def test_bad_inputs_raise_errors_naming_the_argument(params, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(params)


def test_config_round_trips_through_a_plain_dict():
    assert A.ALBEFConfig.from_dict(json.loads(json.dumps(CFG.to_dict()))) == CFG


def test_base_preset_has_the_published_dimensions():
    cfg = A.albef_base()
    assert (cfg.image_width, cfg.image_layers, cfg.image_heads, cfg.patch_size) == (768, 12, 12, 16)
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.fusion_layers) == (768, 6, 12, 6)
    assert (cfg.embed_dim, cfg.queue_size, cfg.momentum, cfg.alpha) == (256, 65536, 0.995, 0.4)


def test_docs_albef_snippets_run():
    import re

    text = (Path(__file__).parents[2] / "docs" / "flava_albef.md").read_text()
    section = text.split("## ALBEF", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "docs/flava_albef.md", "exec"), {})
