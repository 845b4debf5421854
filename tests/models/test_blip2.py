"""BLIP-2: parity with TorchMultimodal's ``BLIP2`` / ``QformerForCLM`` / ``Blip2Phase1Loss``
on identical random weights (Q-Former outputs in each mask, the three stage-one losses on
identical negatives, the generation logits), the converters' round trips and error lists,
and the frozen parts receiving no gradient in either stage."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fmm
from fmm.adapter import ModelAdapter
from fmm.convert import ConversionError
from fmm.nn import TransformerConfig, block, init_block
from models import blip2 as B

CFG = B.Blip2Config(
    vocab_size=40, width=32, layers=3, heads=4, mlp_dim=48, queries=5, max_positions=16,
    bos_id=1, embed_dim=12, image_size=16, patch_size=8, image_width=24, image_layers=2,
    image_heads=2, image_mlp_dim=40,
)  # fmt: skip
BATCH, SEQ = 4, 7


def _reference():
    from tests.reference import reference

    vit = reference("torchmultimodal.modules.encoders.vision_transformer")
    qf = reference("torchmultimodal.models.blip2.qformer_model")
    bl = reference("torchmultimodal.models.blip2.blip2")
    ls = reference("torchmultimodal.modules.losses.blip2_losses")
    torch.manual_seed(0)
    vision = vit.vision_transformer(
        patch_size=CFG.patch_size, hidden_dim=CFG.image_width, dim_feedforward=CFG.image_mlp_dim,
        n_layer=CFG.image_layers, n_head=CFG.image_heads, image_size=CFG.image_size,
    )  # fmt: skip
    qformer = qf.QformerForCLM(
        num_hidden_layers=CFG.layers, dim_q=CFG.width, dim_feedforward=CFG.mlp_dim,
        num_heads=CFG.heads, max_position_embeddings=CFG.max_positions,
        vocab_size=CFG.vocab_size, query_length=CFG.queries, dim_kv=CFG.image_width,
        cross_attention_freq=CFG.cross_attention_freq,
    )  # fmt: skip
    model = bl.BLIP2(
        qformer, vision, dim_q=CFG.width, image_encoder_embedding_dim=CFG.image_width,
        cross_attention_freq=CFG.cross_attention_freq, embedding_dim=CFG.embed_dim,
        num_query_token=CFG.queries, decoder_bos_token_id=CFG.bos_id,
    )  # fmt: skip
    loss = ls.Blip2Phase1Loss(dim_q=CFG.width)
    with torch.no_grad():  # random weights everywhere, norms included, so nothing hides
        for p in [*model.parameters(), *loss.itm_head.parameters()]:
            p.normal_(0.0, 0.2)
        loss.itm_head.weight.mul_(20.0)  # matching logits far enough apart to tell pairs
    return model.eval(), loss.eval(), ls


def _state_dict(model, loss) -> dict:
    return {**model.state_dict(), **{f"loss.{k}": v for k, v in loss.state_dict().items()}}


@pytest.fixture(scope="module")
def ref():
    model, loss, ls = _reference()
    params = B.from_torchmultimodal(_state_dict(model, loss), CFG)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, CFG.image_size, CFG.image_size, generator=g)
    ids = torch.randint(2, CFG.vocab_size, (BATCH, SEQ), generator=g)
    lengths = torch.tensor([SEQ, 3, 5, 2])
    valid = torch.arange(SEQ)[None] < lengths[:, None]
    ids = ids.masked_fill(~valid, CFG.pad_id)
    return dict(model=model, loss=loss, ls=ls, params=params, images=images, ids=ids,
                valid=valid)  # fmt: skip


def _close(got, want):
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_qformer_outputs_equal_torchmultimodal_in_each_mask(ref):
    model, p, ids, valid = ref["model"], ref["params"], ref["ids"], ref["valid"]
    with torch.no_grad():
        out = model(ref["images"], ids, valid.long())
        img = B.encode_image(p, ref["images"], cfg=CFG)
        _close(img, out.image_embeddings)
        queries = B.qformer(p, cfg=CFG, image_embeds=img)
        _close(queries, out.image_qformer_output)
        qm = model.qformer.model
        text = B.qformer(p, cfg=CFG, input_ids=ids, attention_mask=valid, queries=False)
        _close(text, qm(ids, attention_mask=valid.long())[0])
        # Bidirectional over queries and text (ITM's mask), cross-attending to the image.
        both = B.qformer(p, cfg=CFG, input_ids=ids, attention_mask=valid, image_embeds=img)
        mask = torch.cat([torch.ones(BATCH, CFG.queries, dtype=torch.long), valid.long()], 1)
        want = qm(
            ids, attention_mask=mask, query_embeds=model.query_tokens.expand(BATCH, -1, -1),
            encoder_hidden_states=img,
        )[0]  # fmt: skip
        _close(both, want)
        feats = B.embed_image(p, ref["images"], cfg=CFG)
        _close(feats, out.image_features)
        _close(B.embed_text(p, ids, cfg=CFG, attention_mask=valid), out.text_features)


def test_generation_logits_equal_torchmultimodal(ref):
    model, p, ids, valid = ref["model"], ref["params"], ref["ids"], ref["valid"]
    with torch.no_grad():
        want = model(ref["images"], ids, valid.long()).prediction_scores
        img = B.encode_image(p, ref["images"], cfg=CFG)
        got = B.clm_logits(p, img, ids, cfg=CFG, attention_mask=valid)
    assert got.shape == (BATCH, SEQ, CFG.vocab_size)
    _close(got, want)


def _reference_negatives(ls, out, temp, seed):
    # The draws TorchMultimodal's itm_loss makes right after seeding: a negative image per
    # text (softmax(sim_t2i) + 1e-4, the diagonal zeroed), then a negative text per image.
    sim_i2t, sim_t2i = ls.compute_image_text_similarity(out.image_features, out.text_features, temp)
    torch.manual_seed(seed)
    w_t2i = (F.softmax(sim_t2i, 1) + 1e-4).fill_diagonal_(0)
    w_i2t = (F.softmax(sim_i2t, 1) + 1e-4).fill_diagonal_(0)
    neg_image = torch.stack([torch.multinomial(w_t2i[b], 1)[0] for b in range(BATCH)])
    neg_text = torch.stack([torch.multinomial(w_i2t[b], 1)[0] for b in range(BATCH)])
    return neg_text, neg_image


def test_stage_one_losses_equal_torchmultimodal_on_identical_negatives(ref):
    model, loss, p, ids, valid = ref["model"], ref["loss"], ref["params"], ref["ids"], ref["valid"]
    with torch.no_grad():
        out = model(ref["images"], ids, valid.long())
        negatives = _reference_negatives(ref["ls"], out, loss.temp, seed=3)
        torch.manual_seed(3)
        want = loss(out, model, ids, valid.long())
        batch = {"images": ref["images"], "tokens": ids, "attention_mask": valid}
        got = B.stage_one_losses(
            p, batch, cfg=CFG, key=fmm.random.key(0), train=False, negatives=negatives
        )
    _close(got["itc"], want.image_text_contrastive_loss)
    _close(got["itm"], want.image_text_matching_loss)
    _close(got["itg"], want.image_captioning_loss)
    value, metrics = B.loss(p, batch, cfg=CFG, key=fmm.random.key(0), train=False)
    _close(value, metrics["itc"] + metrics["itm"] + metrics["itg"])
    _close(metrics["itc"] + metrics["itg"], got["itc"] + got["itg"])  # negatives only move ITM


def test_the_converters_round_trip_and_list_every_bad_key(ref):
    sd = _state_dict(ref["model"], ref["loss"])
    back = B.to_torchmultimodal(ref["params"], CFG)
    assert back.keys() == sd.keys() - {"qformer.model.embeddings.position_ids"}
    for k, v in back.items():
        torch.testing.assert_close(v, sd[k], atol=1e-7, rtol=1e-6)
    clm = ref["model"].qformer.state_dict()
    part = B.qformer_from_torchmultimodal(clm, CFG)
    for k, v in fmm.tree.flatten(part).items():
        assert torch.equal(v, fmm.tree.flatten(ref["params"])[k]), k
    bad = {k: v for k, v in sd.items() if k != "ln_vision.bias"}
    bad["qformer.extra"] = torch.zeros(1)
    bad["text_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConversionError) as err:
        B.from_torchmultimodal(bad, CFG)
    for name in ("missing: ln_vision.bias", "unexpected: qformer.extra", "text_proj.weight"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="lm"):
        B.from_torchmultimodal(sd, dataclasses.replace(CFG, lm=B.blip2_gpt_tiny().lm))


def _grads(cfg, batch):
    params = B.init(cfg, fmm.random.key(0))
    fn = lambda p: B.loss(p, batch, cfg=cfg, key=fmm.random.key(1))[0]
    return fmm.tree.flatten(torch.func.grad(fn)(params))


def _batch(cfg, vocab, seq):
    g = torch.Generator().manual_seed(4)
    return {
        "images": torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=g),
        "tokens": torch.randint(2, vocab, (3, seq), generator=g),
    }


@pytest.mark.parametrize("preset", ["blip2_tiny", "blip2_gpt_tiny"])
def test_the_frozen_image_encoder_and_lm_receive_no_gradient(preset):
    cfg = B.PRESETS[preset]()
    vocab = cfg.vocab_size if cfg.lm is None else cfg.lm.vocab_size
    grads = _grads(cfg, _batch(cfg, vocab, 6))
    for name, g in grads.items():
        part = name.split(".")[0]
        if part in B.FROZEN_PARTS:
            assert torch.count_nonzero(g) == 0, name
    trained = ("query_tokens", "qformer.transformer.blocks.0.cross.q.weight", "ln_vision.weight")
    trained += ("lm_proj.weight",) if cfg.lm is not None else ("itm_head.weight", "log_temp")
    for name in trained:
        assert torch.count_nonzero(grads[name]) > 0, name
    assert any(k.startswith("lm.") for k in grads) == (cfg.lm is not None)


def test_the_stage_two_prefix_reaches_the_lm_causally():
    cfg = B.blip2_gpt_tiny()
    params = B.init(cfg, fmm.random.key(0))
    batch = _batch(cfg, cfg.lm.vocab_size, 6)
    logits = B.caption_logits(params, batch["images"], batch["tokens"], cfg=cfg)
    assert logits.shape == (3, 6, cfg.lm.vocab_size)
    other = B.caption_logits(params, batch["images"].flip(0), batch["tokens"], cfg=cfg)
    assert not torch.allclose(logits, other)  # the image matters through the prefix
    changed = batch["tokens"].clone()
    changed[:, 4] = (changed[:, 4] + 1) % cfg.lm.vocab_size
    after = B.caption_logits(params, batch["images"], changed, cfg=cfg)
    torch.testing.assert_close(after[:, :4], logits[:, :4])  # no position sees the future


def test_bad_input_is_refused_by_name():
    cfg = B.blip2_tiny()
    params = B.init(cfg, fmm.random.key(0))
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="images"):
        B.loss(params, {"images": images[:, :, :8], "tokens": torch.ones(2, 4).long()}, cfg=cfg,
               key=fmm.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match="tokens"):
        B.loss(params, {"images": images, "tokens": torch.full((2, 4), 99)}, cfg=cfg,
               key=fmm.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match="ids"):
        B.loss(params, {"images": images, "tokens": torch.ones(2, 4).long(),
                        "ids": torch.zeros(3).long()}, cfg=cfg, key=fmm.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match="key="):
        B.loss(params, {"images": images, "tokens": torch.ones(2, 4).long()}, cfg=cfg)
    with pytest.raises(ValueError, match="image_embeds"):
        B.qformer(params, cfg=cfg)
    with pytest.raises(ValueError, match="stage"):
        dataclasses.replace(cfg, stage=2)
    with pytest.raises(ValueError, match="bos_id"):
        dataclasses.replace(cfg, bos_id=64)


def test_a_query_block_is_two_plain_blocks_after_one_self_attention():
    cfg = TransformerConfig(width=16, layers=1, heads=2, cross_dim=8, norm_first=False,
                            query_mlp=True)  # fmt: skip
    p = init_block(cfg, fmm.random.key(0))
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    plain = dataclasses.replace(cfg, query_mlp=False)
    as_queries = {
        k: v for k, v in p.items() if k not in ("mlp", "norm2", "mlp_query", "norm2_query")
    }
    as_queries |= {"mlp": p["mlp_query"], "norm2": p["norm2_query"]}
    _close(
        block(p, x, cfg=cfg, context=ctx, queries=5), block(as_queries, x, cfg=plain, context=ctx)
    )
    as_text = {k: p[k] for k in ("norm1", "attn", "norm2", "mlp")}
    text_cfg = dataclasses.replace(plain, cross_dim=None)
    _close(block(p, x, cfg=cfg, context=ctx, queries=0), block(as_text, x, cfg=text_cfg))
    # Queries that see only queries are untouched by the text after them.
    sees = torch.ones(5, 5, dtype=torch.bool)
    sees[:2, 2:] = False
    mixed = block(p, x, cfg=cfg, context=ctx, queries=2, mask=sees)
    _close(mixed[:, :2], block(p, x[:, :2], cfg=cfg, context=ctx, queries=2))
    with pytest.raises(ValueError, match="queries="):
        block(p, x, cfg=cfg, context=ctx)
    with pytest.raises(ValueError, match="queries="):
        block(as_text, x, cfg=text_cfg, queries=2)


def test_stage_two_under_the_adapter_equals_the_pure_loss_and_leaves_the_lm_alone():
    cfg = B.blip2_gpt_tiny()
    params = B.init(cfg, fmm.random.key(0))
    batch = _batch(cfg, cfg.lm.vocab_size, 6)
    want, _ = B.loss(params, batch, cfg=cfg, key=fmm.random.key(1))
    fn = lambda p, b, *, block_fn: B.loss(p, b, cfg=cfg, key=fmm.random.key(1), block_fn=block_fn)
    model = ModelAdapter(fmm.tree.map(torch.clone, params), fn)
    got, _ = model(batch)
    _close(got, want)
    got.backward()
    for name, p in model.named_parameters():
        if name.split(".")[0] in B.FROZEN_PARTS:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
