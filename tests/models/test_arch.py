"""models.arch composes real parts (CLIP towers, fmm.fusion) exactly as hand-written code."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch

import fmm
from fmm import fusion, nn
from fmm.nn.transformer import TransformerConfig
from models import arch, clip

CFG = dataclasses.replace(clip.clip_tiny(), image_layers=1, text_layers=1)


@pytest.fixture(scope="module")
def clip_params():
    return clip.init(CFG, fmm.random.key(0))


def _inputs(batch=3):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, CFG.vocab_size - 1, (batch, CFG.context_length), generator=g)
    tokens[:, -1] = CFG.vocab_size - 1  # an end-of-text id, the largest in each row
    return {"image": torch.rand(batch, 3, 32, 32, generator=g), "text": tokens}


def _image(p, x):
    return clip.encode_image({"image": p}, x, cfg=CFG, normalize=False)


def _text(p, t):
    return clip.encode_text({"text": p}, t, cfg=CFG, normalize=False)


def test_two_tower_over_clip_towers_equals_clips_logits(clip_params):
    params = {
        "encoders": {"image": clip_params["image"], "text": clip_params["text"]},
        "logit_scale": clip_params["logit_scale"],
    }
    x = _inputs()
    logits = arch.two_tower(params, x, encoders={"text": _text, "image": _image})
    img, txt, scale = clip.apply(clip_params, x["image"], x["text"], cfg=CFG)
    torch.testing.assert_close(logits, scale * img @ txt.T)
    by_text = arch.two_tower(params, x, encoders={"image": _image, "text": _text}, rows="text")
    torch.testing.assert_close(by_text, logits.T)


def test_two_tower_applies_projections_per_modality(clip_params):
    k = fmm.random.key(1)
    proj = {
        "image": nn.init_linear(64, 5, k),
        "text": nn.init_linear(64, 5, fmm.random.fold_in(k, 1)),
    }
    params = {
        "encoders": {"image": clip_params["image"], "text": clip_params["text"]},
        "projections": proj,
        "logit_scale": torch.tensor(0.5),
    }
    x = _inputs()
    got = arch.two_tower(
        params,
        x,
        encoders={"image": _image, "text": _text},
        projections={"image": nn.linear, "text": nn.linear},
    )
    a = torch.nn.functional.normalize(
        nn.linear(proj["image"], _image(clip_params["image"], x["image"])), dim=-1
    )
    b = torch.nn.functional.normalize(
        nn.linear(proj["text"], _text(clip_params["text"], x["text"])), dim=-1
    )
    torch.testing.assert_close(got, torch.tensor(0.5).exp() * a @ b.T)


def test_late_fusion_over_clip_towers_equals_the_hand_written_composition(clip_params):
    fcfg = fusion.DeepSetConfig(
        dims={"image": 64, "text": 64}, dim=16, hidden=24, out_dim=8, attention=True
    )
    params = {
        "encoders": {"image": clip_params["image"], "text": clip_params["text"]},
        "fusion": fusion.init_deepset(fcfg, fmm.random.key(2)),
        "head": nn.init_linear(8, 3, fmm.random.key(3)),
    }
    x = _inputs()
    got = arch.late_fusion(
        params,
        x,
        encoders={"image": _image, "text": _text},
        fusion=partial(fusion.deepset, cfg=fcfg),
        head=nn.linear,
    )
    feats = {
        "image": _image(clip_params["image"], x["image"]),
        "text": _text(clip_params["text"], x["text"]),
    }
    want = nn.linear(params["head"], fusion.deepset(params["fusion"], feats, cfg=fcfg))
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, want)


def test_fusion_encoder_text_over_image_tokens_equals_the_hand_written_composition(clip_params):
    fcfg = fusion.CrossAttentionFusionConfig(
        transformer=TransformerConfig(
            width=CFG.text_width, layers=1, heads=4, cross_dim=CFG.image_width
        )
    )
    params = {
        "encoders": {"image": clip_params["image"], "text": clip_params["text"]},
        "fusion": fusion.init_cross_attention_fusion(fcfg, fmm.random.key(4)),
        "heads": {
            "itm": nn.init_linear(CFG.text_width, 2, fmm.random.key(5)),
            "mlm": nn.init_linear(CFG.text_width, CFG.vocab_size, fmm.random.key(6)),
        },
    }
    encoders = {
        "image": lambda p, x: clip.image_features({"image": p}, x, cfg=CFG),
        "text": lambda p, t: clip.text_features({"text": p}, t, cfg=CFG),
    }
    heads = {"itm": lambda p, h: nn.linear(p, h[:, 0]), "mlm": nn.linear}
    x = _inputs()
    out = arch.fusion_encoder(
        params,
        x,
        encoders=encoders,
        fusion=partial(fusion.cross_attention_fusion, cfg=fcfg),
        query="text",
        context="image",
        heads=heads,
    )
    img = clip.image_features(clip_params, x["image"], cfg=CFG)
    txt = clip.text_features(clip_params, x["text"], cfg=CFG)
    fused = fusion.cross_attention_fusion(params["fusion"], txt, img, cfg=fcfg)
    torch.testing.assert_close(out["itm"], nn.linear(params["heads"]["itm"], fused[:, 0]))
    torch.testing.assert_close(out["mlm"], nn.linear(params["heads"]["mlm"], fused))
    assert out["mlm"].shape == (3, CFG.context_length, CFG.vocab_size)


def test_bad_inputs_are_errors_naming_what_is_wrong(clip_params):
    enc = {"image": _image, "text": _text}
    params = {
        "encoders": {"image": clip_params["image"], "text": clip_params["text"]},
        "logit_scale": torch.tensor(0.0),
    }
    x = _inputs()
    with pytest.raises(ValueError, match=r"missing \['text'\]"):
        arch.two_tower(params, {"image": x["image"]}, encoders=enc)
    with pytest.raises(ValueError, match=r"extra \['audio'\]"):
        arch.two_tower(params, {**x, "audio": x["image"]}, encoders=enc)
    with pytest.raises(ValueError, match="rows='audio'"):
        arch.two_tower(params, x, encoders=enc, rows="audio")
    with pytest.raises(ValueError, match=r"params lack \['logit_scale'\]"):
        arch.two_tower({"encoders": params["encoders"]}, x, encoders=enc)
    with pytest.raises(ValueError, match=r"params\['encoders'\] has no 'text'"):
        arch.late_fusion(
            {"encoders": {"image": clip_params["image"]}, "fusion": {}, "head": {}},
            x,
            encoders=enc,
            fusion=lambda p, f: f,
            head=lambda p, z: z,
        )
    with pytest.raises(ValueError, match="must be two different"):
        arch.fusion_encoder(
            {"encoders": {}, "fusion": {}, "heads": {}},
            x,
            encoders=enc,
            fusion=lambda p, q, c: q,
            query="text",
            context="text",
            heads={},
        )


def test_late_fusion_example_trains_a_few_steps():
    from examples import late_fusion

    results = late_fusion.main(["--steps", "3", "--batch", "8", "--eval", "16", "--width", "8"])
    assert set(results) == {"image+text", "image"}
    assert all(0.0 <= acc <= 1.0 for acc in results.values())
