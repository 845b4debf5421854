"""FLAVA: TorchMultimodal parity of the encoders and heads on identical random weights,
converter strictness and round trip, presets, laws (masking, padding), the family record and
the docs. The pretraining objective and its errors: test_flava_pretrain.py."""

import dataclasses
from functools import partial
from pathlib import Path

import pytest
import torch

import fmm
import models
from fmm.convert import ConversionError
from models import clip, flava
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


def tmm_flava(cfg, *, seed=0, dtype=torch.float64):
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
    model = tmm_flava(SMALL)
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
    model = tmm_flava(cfg, seed=1, dtype=torch.float32)
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
    model = tmm_flava(SMALL, seed=3, dtype=torch.float32)
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


def test_docs_flava_snippets_run():
    import re

    text = (Path(__file__).parents[2] / "docs" / "flava_albef.md").read_text()
    section = text.split("## FLAVA", 1)[1].split("\n## ", 1)[0]  # ALBEF's section follows
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "docs/flava_albef.md", "exec"), {})
