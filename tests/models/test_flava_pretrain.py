"""FLAVA's pretraining objective on a tiny preset: finite, pure and reaching every param,
every encoder pass through ``block_fn``, MIM targets from any tokenizer, one graph under
compile, errors at the boundary, and each task's loss against TorchMultimodal's
``FLAVAPretrainingLoss`` on identical weights."""

import dataclasses
import json
from functools import partial

import pytest
import torch

import fmm
from fmm.losses import IGNORE, masked_cross_entropy
from models import flava, vqvae
from tests.models.test_flava import SMALL, tmm_flava
from tests.reference import reference


@pytest.fixture(scope="module")
def tiny():
    pretrain = flava.PretrainConfig(mask_id=29, special_ids=(1, 2, 28), text_mask_rate=0.3)
    cfg = flava.flava_tiny(vocab_size=30, max_positions=10, image_vocab_size=16, pretrain=pretrain)
    params = flava.init(cfg, fmm.random.key(0))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 28, (6, 10), generator=g)
    ids[:, 0], ids[:, 7], ids[:, 8:] = 2, 28, 0
    images = torch.rand(6, 3, 32, 32, generator=g)
    tok = flava.random_codebook_tokenizer(fmm.random.key(1), patch_size=8, codebook_size=16)
    batch = {"images": images, "tokens": ids, "image_codes": tok(images)}
    return cfg, params, batch


def test_pretraining_loss_is_finite_pure_and_reaches_every_param(tiny):
    cfg, params, batch = tiny
    fn = partial(flava.loss, cfg=cfg)
    leaves = fmm.tree.map(lambda x: x.detach().requires_grad_(True), params)
    loss, metrics = fn(leaves, batch, key=fmm.random.key(5))
    assert set(flava.TASKS) <= metrics.keys()
    assert all(torch.isfinite(metrics[t]) and metrics[t] > 0 for t in flava.TASKS)
    torch.testing.assert_close(loss.detach(), sum(metrics[t] for t in flava.TASKS))
    loss.backward()
    no_grad = [
        k
        for k, v in fmm.tree.flatten(leaves).items()
        if v.grad is None or not v.grad.abs().sum() > 0
    ]
    # The mask token is used, mm poolers and the unused image/text poolers are not.
    assert sorted(no_grad) == [
        f"{m}.pooler.{w}" for m in ("image", "mm", "text") for w in ("bias", "weight")
    ]
    again, _ = fn(params, batch, key=fmm.random.key(5))
    torch.testing.assert_close(again, loss.detach())
    other, _ = fn(params, batch, key=fmm.random.key(6))
    assert not torch.equal(other, loss.detach())


def test_the_loss_runs_every_block_of_its_five_encoder_passes_through_block_fn(tiny):
    cfg, params, batch = tiny
    ran = []

    def block_fn(block_params, x, **kwargs):
        ran.append(id(block_params))
        return fmm.nn.block(block_params, x, **kwargs)

    got, _ = flava.loss(params, batch, cfg=cfg, key=fmm.random.key(5), block_fn=block_fn)
    want, _ = flava.loss(params, batch, cfg=cfg, key=fmm.random.key(5))
    torch.testing.assert_close(got, want)
    blocks = lambda part: [id(b) for b in params[part]["transformer"]["blocks"]]
    # plain image and text passes, masked ones, then the multimodal encoder
    assert ran == 2 * (blocks("image") + blocks("text")) + blocks("mm")


def test_mim_targets_come_from_any_tokenizer_such_as_our_vqvae(tiny):
    cfg, params, batch = tiny
    vq_cfg = vqvae.vqvae_shapes_4x4()  # 32 px -> 4 x 4 codes: one per FLAVA patch
    vq_params = vqvae.init(vq_cfg, fmm.random.key(2))
    cfg = dataclasses.replace(cfg, image_vocab_size=vq_cfg.codebook_size)
    params = flava.init(cfg, fmm.random.key(0))
    codes = vqvae.encode(vq_params, batch["images"], cfg=vq_cfg)
    mask = torch.zeros(6, cfg.num_patches, dtype=torch.bool)
    mask[:, ::3] = True
    labels = flava.mim_targets(codes, mask, cfg=cfg)
    assert torch.equal(labels[mask], codes.reshape(6, -1)[mask])
    assert (labels[~mask] == IGNORE).all()
    batch = {**batch, "image_codes": codes}
    loss, metrics = flava.loss(params, batch, cfg=cfg, key=fmm.random.key(0))
    assert torch.isfinite(loss) and metrics["mim"] > 0
    # mmm scores only matching pairs: with every pair a negative it has nothing to score.
    neg = dataclasses.replace(
        cfg, pretrain=dataclasses.replace(cfg.pretrain, itm_negative_rate=1.0)
    )
    _, m = flava.loss(params, batch, cfg=neg, key=fmm.random.key(0))
    assert m["mmm_text"] == 0 and m["mmm_image"] == 0 and m["mlm"] > 0
    assert masked_cross_entropy(torch.zeros(1, 1, 3), torch.full((1, 1), IGNORE)) == 0


def test_image_codes_are_required_exactly_when_an_image_task_is_weighted(tiny):
    cfg, params, batch = tiny
    fields = flava.batch_fields(cfg)
    assert not fields["image_codes"].optional and fields["attention_mask"].optional
    no_codes = {k: v for k, v in batch.items() if k != "image_codes"}
    with pytest.raises(ValueError, match=r"batch lacks \['image_codes'\]"):
        flava.loss(params, no_codes, cfg=cfg, key=fmm.random.key(0))
    weights = tuple((t, w) for t, w in cfg.pretrain.weights if t not in ("mim", "mmm_image"))
    text_only = dataclasses.replace(
        cfg, pretrain=dataclasses.replace(cfg.pretrain, weights=weights)
    )
    assert flava.batch_fields(text_only)["image_codes"].optional
    loss, metrics = flava.loss(params, no_codes, cfg=text_only, key=fmm.random.key(0))
    assert metrics["mim"] == 0 and metrics["mmm_image"] == 0
    torch.testing.assert_close(
        loss, sum(metrics[t] for t in flava.TASKS if t not in ("mim", "mmm_image"))
    )


def test_an_explicit_attention_mask_equal_to_the_pad_rule_changes_nothing(tiny):
    cfg, params, batch = tiny
    key = fmm.random.key(4)
    want, _ = flava.loss(params, batch, cfg=cfg, key=key)
    masked = {**batch, "attention_mask": batch["tokens"] != cfg.pad_id}
    torch.testing.assert_close(flava.loss(params, masked, cfg=cfg, key=key)[0], want)


def test_the_config_round_trips_through_json_and_stays_hashable(tiny):
    cfg = tiny[0]
    back = flava.FLAVAConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg)
    assert flava.FLAVAConfig.from_dict({"vocab_size": 99}).pretrain == flava.PretrainConfig()


def test_pretraining_loss_traces_as_one_graph_with_the_same_values(tiny):
    """The whole objective (masks, negatives, encoders, heads) captures as one graph, so a
    compiled train step never falls back to eager."""
    cfg, params, batch = tiny
    fn = partial(flava.loss, cfg=cfg)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    key = fmm.random.key(7)
    loss, metrics = compiled(params, batch, key=key)
    want, want_metrics = fn(params, batch, key=key)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(metrics, want_metrics)


def test_bad_inputs_raise_clear_errors(tiny):
    cfg, params, batch = tiny
    images, ids = batch["images"], batch["tokens"]
    with pytest.raises(
        ValueError, match=r"images must have shape \[batch, 3, 32, 32\], got \[6, 3, 16, 16\]"
    ):
        flava.encode_image(params["image"], images[:, :, :16, :16], cfg=cfg)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 30\)"):
        flava.encode_text(params["text"], ids + 100, cfg=cfg)
    with pytest.raises(ValueError, match="max_positions=10"):
        flava.encode_text(params["text"], torch.ones(2, 11, dtype=torch.long), cfg=cfg)
    with pytest.raises(
        ValueError, match=r"input_ids is missing: .* needs both images and input_ids"
    ):
        flava.apply(params, images, None, cfg=cfg)
    with pytest.raises(ValueError, match="text_hidden is missing"):
        flava.encode_multimodal(params, torch.zeros(6, 17, 64), None, cfg=cfg)
    with pytest.raises(
        ValueError, match=r"text_hidden must have shape \[batch, seq, 64\], got \[6, 10, 48\]"
    ):
        flava.encode_multimodal(params, torch.zeros(6, 17, 64), torch.zeros(6, 10, 48), cfg=cfg)
    with pytest.raises(ValueError, match=r"input_ids and images must have the same batch size"):
        flava.apply(params, images[:2], ids, cfg=cfg)
    with pytest.raises(ValueError, match=r"patch_mask must have shape \[6, 16\], got \[6, 15\]"):
        flava.encode_image(
            params["image"], images, cfg=cfg, patch_mask=torch.zeros(6, 15, dtype=torch.bool)
        )
    coarse = {**batch, "image_codes": torch.zeros(6, 2, 2, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"batch\['image_codes'\] must have shape \[6, 4, 4\]"):
        flava.loss(params, coarse, cfg=cfg, key=fmm.random.key(0))
    with pytest.raises(ValueError, match=r"key= is missing"):
        flava.loss(params, batch, cfg=cfg)
    with pytest.raises(ValueError, match=r"cfg.pretrain.mask_id=103 lies outside"):
        flava.loss(params, batch, cfg=dataclasses.replace(cfg, pretrain=flava.PretrainConfig()),
                   key=fmm.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match="image_size=30 is not a multiple of patch_size=8"):
        dataclasses.replace(cfg, image_size=30)
    with pytest.raises(ValueError, match="unknown tasks"):
        flava.PretrainConfig(mask_id=1, weights=(("mlm", 1.0), ("nsp", 1.0)))


def test_pretraining_task_losses_match_torchmultimodal_flava_loss():
    """Our MLM, MIM, ITM, MMM and contrastive terms against TorchMultimodal's
    ``FLAVAPretrainingLoss`` on identical weights, sequences, masks and pairs (one width
    for every encoder, as its heads assume; no padding, which its multimodal encoder
    would attend to)."""
    tmm_losses = reference("torchmultimodal.modules.losses.flava")
    cfg = dataclasses.replace(
        SMALL, image_size=8, text_width=24, mm_width=24, mm_heads=3, text_layers=1,
        image_layers=1, mm_layers=1, embed_dim=24,
    )  # fmt: skip
    model = tmm_flava(cfg, seed=4)
    params = flava.from_torchmultimodal(model.state_dict(), cfg, dtype=None)
    params["heads"] = fmm.tree.map(
        lambda x: x + 0.05 * torch.randn_like(x),
        flava.init_heads(cfg, fmm.random.key(1), dtype=torch.float64),
    )
    ref = tmm_losses.FLAVAPretrainingLoss(hidden_size=24, text_vocab_size=23, image_vocab_size=13)
    ref = ref.double().eval()
    h = params["heads"]
    with torch.no_grad():
        for mod, ours in (
            (ref.mlm_loss.cls, h["mlm"]), (ref.mim_loss.cls, h["mim"]),
            (ref.mmm_loss.mlm.cls, h["mmm_text"]), (ref.mmm_loss.mim.cls, h["mmm_image"]),
        ):  # fmt: skip
            mod.dense.weight.copy_(ours["transform"]["weight"])
            mod.dense.bias.copy_(ours["transform"]["bias"])
            mod.layer_norm.weight.copy_(ours["norm"]["weight"])
            mod.layer_norm.bias.copy_(ours["norm"]["bias"])
            mod.decoder.weight.copy_(ours["decoder"]["weight"])
            mod.bias.copy_(ours["decoder"]["bias"])
        ref.itm_loss.pooler.dense.weight.copy_(h["itm"]["pooler"]["weight"])
        ref.itm_loss.pooler.dense.bias.copy_(h["itm"]["pooler"]["bias"])
        ref.itm_loss.cls.seq_relationship.weight.copy_(h["itm"]["out"]["weight"])
        ref.itm_loss.cls.seq_relationship.bias.copy_(h["itm"]["out"]["bias"])
        ref.contrastive_loss.logit_scale.copy_(h["logit_scale"])

    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 22, (6, 7), generator=g)
    images = torch.rand(6, 3, 8, 8, generator=g, dtype=torch.float64)
    pretrain = flava.PretrainConfig(
        mask_id=22, special_ids=(), text_mask_rate=0.4, patch_mask_rate=0.5
    )
    cfg = dataclasses.replace(cfg, pretrain=pretrain)
    tok = flava.random_codebook_tokenizer(fmm.random.key(2), patch_size=4, codebook_size=13)
    batch = {"images": images, "tokens": ids, "image_codes": tok(images)}
    masks = flava.draw_masks(batch, fmm.random.key(3), cfg=cfg)
    assert 0 < int(masks.itm_labels.sum()) < 6  # both positives and negatives
    with torch.no_grad():
        ours, _ = flava.task_losses(params, batch, masks, cfg=cfg)
        images, p = batch["images"], masks.partner
        plain = model(image=images, text=ids)
        uni = model(image=images, text=ids, image_patches_mask=masks.patch_mask,
                    text_masked=masks.masked_tokens, required_embedding="image")  # fmt: skip
        text_m = model.encode_text(masks.masked_tokens)
        fused = model(image=images, text=ids[p], image_patches_mask=masks.patch_mask,
                      text_masked=masks.masked_tokens[p])  # fmt: skip
        unimodal = ref(
            image_masked_sequence=uni.image_masked.last_hidden_state,
            text_masked_sequence=text_m.last_hidden_state,
            mim_labels=masks.mim_labels, mlm_labels=masks.mlm_labels,
            projected_image_embeddings=plain.projected_image_embeddings,
            projected_text_embeddings=plain.projected_text_embeddings,
        ).losses  # fmt: skip
        multimodal = ref(
            multimodal_masked_sequence=fused.multimodal_masked.last_hidden_state,
            itm_labels=masks.itm_labels, mlm_labels=masks.mlm_labels,
            mim_labels=masks.mim_labels,
        ).losses  # fmt: skip
    close = partial(torch.testing.assert_close, rtol=0, atol=1e-6)
    close(ours["mlm"], unimodal.mlm_loss)
    close(ours["mim"], unimodal.mim_loss)
    close(ours["contrastive"], unimodal.global_contrastive_loss)
    close(ours["itm"], multimodal.itm_loss)
    close(ours["mmm_text"], multimodal.mmm_text_loss)
    close(ours["mmm_image"], multimodal.mmm_image_loss)
