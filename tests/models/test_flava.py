"""FLAVA: TorchMultimodal parity on identical random weights, converter strictness and
round trip, the pretraining objective, laws (masking, padding) and errors at the boundary."""

import dataclasses
import json
from functools import partial
from pathlib import Path

import pytest
import torch

import fmm
import models
from fmm.convert import ConversionError
from fmm.losses import IGNORE, masked_cross_entropy
from models import clip, flava, vqvae
from tests.reference import reference

# Odd, unequal widths so a transposed, mis-split or swapped weight cannot pass by shape.
SMALL = flava.FLAVAConfig(
    image_size=12, patch_size=4, image_width=24, image_layers=2, image_heads=3,
    image_mlp_dim=40, vocab_size=23, max_positions=9, text_width=18, text_layers=2,
    text_heads=3, text_mlp_dim=37, mm_width=30, mm_layers=2, mm_heads=5, mm_mlp_dim=44,
    embed_dim=10, image_vocab_size=13,
)  # fmt: skip


def _tmm_kwargs(cfg):
    return dict(
        image_hidden_size=cfg.image_width, image_num_attention_heads=cfg.image_heads,
        image_num_hidden_layers=cfg.image_layers, image_intermediate_size=cfg.image_mlp_dim,
        image_size=cfg.image_size, patch_size=cfg.patch_size,
        text_hidden_size=cfg.text_width, text_num_attention_heads=cfg.text_heads,
        text_num_hidden_layers=cfg.text_layers, text_intermediate_size=cfg.text_mlp_dim,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions,
        multimodal_hidden_size=cfg.mm_width, multimodal_num_attention_heads=cfg.mm_heads,
        multimodal_num_hidden_layers=cfg.mm_layers, multimodal_intermediate_size=cfg.mm_mlp_dim,
        text_and_image_proj_size=cfg.embed_dim,
    )  # fmt: skip


def _tmm_flava(cfg, *, seed=0, dtype=torch.float64):
    """A random-weight TorchMultimodal ``FLAVAModel`` built directly (no downloads), with
    every tensor perturbed so a dropped bias, norm or token shows."""
    tmm = reference("torchmultimodal.models.flava.model")
    torch.manual_seed(seed)
    model = tmm.flava_model(**_tmm_kwargs(cfg)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def small():
    model = _tmm_flava(SMALL)
    params = flava.from_torchmultimodal(model.state_dict(), SMALL, dtype=None)
    return model, params


def _inputs(cfg, b=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g, dtype=dtype)
    ids = torch.randint(1, cfg.vocab_size, (b, cfg.max_positions - 2), generator=g)
    ids[0, 4:] = cfg.pad_id  # padding, which both text encoders must ignore
    patch_mask = torch.rand(b, cfg.num_patches, generator=g) < 0.5
    return images, ids, patch_mask


def test_encoders_match_torchmultimodal_on_identical_weights(small):
    model, params = small
    images, ids, patch_mask = _inputs(SMALL)
    with torch.no_grad():
        ref = model(
            image=images, text=ids, image_patches_mask=patch_mask, text_masked=ids,
            skip_unmasked_mm_encoder=False,
        )  # fmt: skip
        ours = flava.apply(params, images, ids, cfg=SMALL)
        image_m = flava.encode_image(params["image"], images, cfg=SMALL, patch_mask=patch_mask)
        text = flava.encode_text(params["text"], ids, cfg=SMALL)
        mm_m = flava.encode_multimodal(params, image_m.hidden, text.hidden, cfg=SMALL)
    close = partial(torch.testing.assert_close, rtol=0, atol=1e-5)
    close(ours["image"], ref.image.last_hidden_state)
    close(ours["text"], ref.text.last_hidden_state)
    close(ours["multimodal"], ref.multimodal.last_hidden_state)
    close(ours["image_embed"], ref.projected_image_embeddings)
    close(ours["text_embed"], ref.projected_text_embeddings)
    close(image_m.sequence, ref.image_masked.last_hidden_state)
    close(image_m.hidden, ref.image_masked.hidden_states[-1])
    close(text.hidden, ref.text.hidden_states[-1])
    close(mm_m, ref.multimodal_masked.last_hidden_state)
    close(flava.pooler(params["image"], ours["image"]), ref.image.pooler_output)
    close(flava.pooler(params["text"], ours["text"]), ref.text.pooler_output)
    close(flava.pooler(params["mm"], ours["multimodal"]), ref.multimodal.pooler_output)


def test_real_width_layers_match_torchmultimodal_in_float32():
    """One layer per encoder at the published width (768, 12 heads, MLP 3072)."""
    cfg = dataclasses.replace(
        flava.flava_model(), image_size=32, image_layers=1, text_layers=1, mm_layers=1,
        vocab_size=50, max_positions=12, embed_dim=768,
    )  # fmt: skip
    model = _tmm_flava(cfg, seed=1, dtype=torch.float32)
    params = flava.from_torchmultimodal(model.state_dict(), cfg)
    images, ids, patch_mask = _inputs(cfg, b=2, seed=1, dtype=torch.float32)
    with torch.no_grad():
        ref = model(image=images, text=ids, image_patches_mask=patch_mask, text_masked=ids)
        image_m = flava.encode_image(params["image"], images, cfg=cfg, patch_mask=patch_mask)
        text = flava.encode_text(params["text"], ids, cfg=cfg)
        mm = flava.encode_multimodal(params, image_m.hidden, text.hidden, cfg=cfg)
    close = partial(torch.testing.assert_close, rtol=0, atol=1e-5)
    close(image_m.sequence, ref.image_masked.last_hidden_state)
    close(text.sequence, ref.text_masked.last_hidden_state)
    close(mm, ref.multimodal_masked.last_hidden_state)


def test_heads_match_torchmultimodal_loss_heads():
    losses = reference("torchmultimodal.modules.losses.flava")
    torch.manual_seed(2)
    mlm = losses.MaskedPredictionHead(hidden_size=18, vocab_size=23).double()
    itm = losses.ITMLoss(hidden_size=30).double()
    ours_mlm = {
        "transform": {"weight": mlm.dense.weight, "bias": mlm.dense.bias},
        "norm": {"weight": mlm.layer_norm.weight, "bias": mlm.layer_norm.bias},
        "decoder": {"weight": mlm.decoder.weight, "bias": mlm.bias},
    }
    ours_itm = {
        "pooler": {"weight": itm.pooler.dense.weight, "bias": itm.pooler.dense.bias},
        "out": {"weight": itm.cls.seq_relationship.weight, "bias": itm.cls.seq_relationship.bias},
    }
    h_text, h_mm = torch.randn(2, 5, 18, dtype=torch.float64), torch.randn(2, 7, 30).double()
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        torch.testing.assert_close(flava.masked_head(ours_mlm, h_text), mlm(h_text))
        ref_itm = itm(h_mm, labels)
        torch.testing.assert_close(flava.itm_head(ours_itm, h_mm), ref_itm.logits)
        torch.testing.assert_close(
            fmm.losses.matching_loss(flava.itm_head(ours_itm, h_mm), labels), ref_itm.loss
        )


def test_converter_round_trip_is_exact_and_loads_strictly():
    model = _tmm_flava(SMALL, seed=3, dtype=torch.float32)
    sd = model.state_dict()
    back = flava.to_torchmultimodal(flava.from_torchmultimodal(sd, SMALL), SMALL)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    model.load_state_dict(back, strict=True)


def test_converter_lists_every_bad_key_of_another_size_or_family(small):
    model, _ = small
    sd = dict(model.state_dict())
    sd.pop("mm_encoder.pooler.dense.bias")
    sd["extra.weight"] = torch.zeros(1)
    wider = dataclasses.replace(SMALL, text_width=21, text_heads=3)
    with pytest.raises(ConversionError) as err:
        flava.from_torchmultimodal(sd, wider)
    msg = str(err.value)
    assert "missing: mm_encoder.pooler.dense.bias" in msg
    assert "unexpected: extra.weight" in msg
    assert "mismatched text_encoder.layernorm.weight: expected [21], got [18]" in msg
    clip_sd = clip.init(clip.clip_tiny(), fmm.random.key(0))
    with pytest.raises(ConversionError, match=r"missing: image_encoder\.embeddings\.cls_token"):
        flava.from_torchmultimodal(fmm.tree.flatten(clip_sd), SMALL)


def test_flava_model_has_the_published_dimensions():
    cfg = models.get_config("flava_model")
    assert (cfg.image_width, cfg.text_width, cfg.mm_width) == (768, 768, 768)
    assert (cfg.image_layers, cfg.text_layers, cfg.mm_layers) == (12, 12, 6)
    assert (cfg.image_heads, cfg.text_heads, cfg.mm_heads) == (12, 12, 12)


def test_an_all_false_patch_mask_changes_nothing_and_masking_changes_only_via_tokens(small):
    _, params = small
    images, _, _ = _inputs(SMALL)
    plain = flava.encode_image(params["image"], images, cfg=SMALL).sequence
    none = torch.zeros(3, SMALL.num_patches, dtype=torch.bool)
    torch.testing.assert_close(
        flava.encode_image(params["image"], images, cfg=SMALL, patch_mask=none).sequence, plain
    )
    # Fully masked images all look alike: only the mask token and positions remain.
    full = flava.encode_image(params["image"], images, cfg=SMALL, patch_mask=~none).sequence
    torch.testing.assert_close(full[0], full[1])


def test_text_and_multimodal_outputs_ignore_trailing_padding(small):
    _, params = small
    images, ids, _ = _inputs(SMALL)
    short = ids[:, :5].clone()
    short[0, 4:] = SMALL.pad_id
    padded = torch.cat([short, torch.full((3, 2), SMALL.pad_id)], dim=1)
    a = flava.apply(params, images, short, cfg=SMALL, attention_mask=short != SMALL.pad_id)
    b = flava.apply(params, images, padded, cfg=SMALL, attention_mask=padded != SMALL.pad_id)
    real = short != SMALL.pad_id
    torch.testing.assert_close(a["text"][real], b["text"][:, :5][real])
    torch.testing.assert_close(a["multimodal"][:, 0], b["multimodal"][:, 0])
    torch.testing.assert_close(a["text_embed"], b["text_embed"])


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


def test_the_family_record_names_its_parts():
    family = flava.FAMILY
    assert family.loss is flava.loss and family.init is flava.init
    assert family.loss_extras == ("gather",)
    assert set(family.presets) == {"flava_model", "flava_tiny", "flava_1.8b", "flava_10b"}
    assert family.converters["torchmultimodal"].from_ is flava.from_torchmultimodal
    big = family.presets["flava_1.8b"]()
    assert (big.image_width, big.image_layers, big.mm_layers, big.image_heads) == (
        1280, 32, 16, 16
    )  # fmt: skip


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


def test_docs_flava_snippets_run():
    import re

    text = (Path(__file__).parents[2] / "docs" / "flava_albef.md").read_text()
    section = text.split("## FLAVA", 1)[1].split("\n## ", 1)[0]  # ALBEF's section follows
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "docs/flava_albef.md", "exec"), {})


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
    model = _tmm_flava(cfg, seed=4)
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
