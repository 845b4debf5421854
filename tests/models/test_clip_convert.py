"""CLIP parity with the reference implementations on identical (random) weights.

Each reference model is built from a config with the published widths and fewer layers,
every parameter (norms and biases included) is randomised so a swapped or transposed
tensor cannot hide, the weights are converted, and both compute on the same inputs.
"""

import json
from dataclasses import replace

import pytest
import torch

from fmm.convert import ConversionError
from models.clip import CLIPConfig, convert, model
from tests.reference import reference

# The published widths (ViT-B/16 image tower, OpenAI text tower), two layers each.
CFG = CLIPConfig(
    embed_dim=512, image_size=224, patch_size=16, image_width=768, image_layers=2,
    image_heads=12, context_length=77, vocab_size=49408, text_width=512, text_layers=2,
    text_heads=8, act="quick_gelu",
)  # fmt: skip
TOL = 1e-5


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: matrices small, norm weights around 1, the temperature
    (a scalar) at a typical trained value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 0:
                p.fill_(4.0)
            elif "norm" in name or "ln_" in name or "layrnorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.05 * torch.randn(p.shape, generator=g))  # fmt: skip
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return module.eval()


def inputs(cfg: CLIPConfig, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.zeros(batch, cfg.context_length, dtype=torch.int64)
    for i, length in enumerate([5, 17, cfg.context_length][:batch]):
        tokens[i, 0] = cfg.vocab_size - 2  # start of text
        tokens[i, 1 : length - 1] = torch.randint(1, cfg.vocab_size - 2, (length - 2,), generator=g)
        tokens[i, length - 1] = cfg.vocab_size - 1  # end of text: the largest id
    return images, tokens


def assert_same(ours, theirs_img, theirs_txt, theirs_scale, *, images, tokens, cfg=CFG):
    img, txt, scale = model.apply(ours, images, tokens, cfg=cfg)
    torch.testing.assert_close(img, theirs_img, atol=TOL, rtol=0)
    torch.testing.assert_close(txt, theirs_txt, atol=TOL, rtol=0)
    logits = scale * img @ txt.T
    torch.testing.assert_close(logits, theirs_scale * theirs_img @ theirs_txt.T, atol=TOL, rtol=0)


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def open_clip_model():
    oc = reference("open_clip")
    spec = convert.OPEN_CLIP_CONFIGS["ViT-B-16"]
    vision = dict(spec["vision_cfg"], layers=2)
    text = dict(spec["text_cfg"], layers=2)
    return randomize_(oc.model.CLIP(512, vision, text, quick_gelu=True), seed=1)


@pytest.fixture(scope="module")
def hf_model():
    import transformers

    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                         num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=77),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                           num_attention_heads=12, image_size=224, patch_size=16),
        projection_dim=512,
    )  # fmt: skip
    return randomize_(transformers.CLIPModel(config), seed=2)


@pytest.fixture(scope="module")
def tmm_model():
    tmm = reference("torchmultimodal.models.clip.model")
    image = reference("torchmultimodal.models.clip.image_encoder")
    text = reference("torchmultimodal.models.clip.text_encoder")
    return randomize_(
        tmm.CLIP(
            encoder_a=image.CLIPViTEncoder(512, patch_size=16, image_size=224, width=768,
                                           heads=12, layers=2),
            encoder_b=text.CLIPTextEncoder(512, context_length=77, vocab_size=49408, width=512,
                                           dim_feedforward=2048, heads=8, layers=2),
        ),
        seed=3,
    )  # fmt: skip


def test_open_clip_parity_and_round_trip(open_clip_model):
    sd = open_clip_model.state_dict()
    params = convert.from_open_clip(sd, CFG)
    images, tokens = inputs(CFG)
    with torch.no_grad():
        img, txt, scale = open_clip_model(images, tokens)
    assert_same(params, img, txt, scale, images=images, tokens=tokens)
    assert_state_dicts_equal(convert.to_open_clip(params, CFG), sd)
    assert open_clip_model.load_state_dict(convert.to_open_clip(params, CFG), strict=True)


def test_hf_parity_and_round_trip(hf_model):
    sd = hf_model.state_dict()
    cfg = convert.config_from_hf(hf_model.config)
    assert cfg.init_logit_scale == pytest.approx(2.6592)  # HF's default logit_scale_init_value
    assert replace(cfg, init_logit_scale=CFG.init_logit_scale) == CFG
    params = convert.from_hf(sd, cfg)
    images, tokens = inputs(cfg)
    with torch.no_grad():
        out = hf_model(input_ids=tokens, pixel_values=images)
    scale = hf_model.logit_scale.exp()
    assert_same(params, out.image_embeds, out.text_embeds, scale, images=images, tokens=tokens)
    img, txt, ours_scale = model.apply(params, images, tokens, cfg=cfg)
    torch.testing.assert_close(ours_scale * img @ txt.T, out.logits_per_image, atol=TOL, rtol=0)
    exported = convert.to_hf(params, cfg)
    assert_state_dicts_equal(exported, {k: v for k, v in sd.items() if k in exported})
    assert set(sd) - set(exported) <= set(convert._HF_EXTRAS)


def test_torchmultimodal_parity_and_round_trip(tmm_model):
    sd = tmm_model.state_dict()
    params = convert.from_torchmultimodal(sd, CFG, logit_scale=4.0)
    images, tokens = inputs(CFG)
    with torch.no_grad():
        out = tmm_model(images, tokens)
    scale = torch.tensor(4.0).exp()
    assert_same(params, out.embeddings_a, out.embeddings_b, scale, images=images, tokens=tokens)
    assert_state_dicts_equal(convert.to_torchmultimodal(params, CFG), sd)


def test_formats_agree_with_each_other(open_clip_model):
    """open_clip -> ours -> hf -> ours -> torchmultimodal -> ours is lossless."""
    params = convert.from_open_clip(open_clip_model.state_dict(), CFG)
    via_hf = convert.from_hf(convert.to_hf(params, CFG), CFG)
    via_tmm = convert.from_torchmultimodal(
        convert.to_torchmultimodal(via_hf, CFG), CFG, logit_scale=float(params["logit_scale"])
    )
    assert_state_dicts_equal(convert.to_open_clip(via_tmm, CFG), open_clip_model.state_dict())


def test_config_inferred_from_weights(open_clip_model, hf_model, tmm_model):
    assert convert.config_from_state_dict(open_clip_model.state_dict(), "open_clip") == CFG
    assert convert.config_from_state_dict(hf_model.state_dict(), "hf") == CFG
    assert convert.config_from_state_dict(tmm_model.state_dict(), "torchmultimodal") == CFG


def test_config_from_open_clip_names():
    b16 = convert.config_from_open_clip("ViT-B-16-quickgelu")
    assert (b16.image_width, b16.image_heads, b16.text_width, b16.act) == (
        768,
        12,
        512,
        "quick_gelu",
    )
    assert convert.config_from_open_clip("ViT-H-14").image_heads == 16  # head width 80
    assert convert.config_from_open_clip("ViT-B-16").act == "gelu"
    with pytest.raises(ValueError, match="unknown model name 'ViT-Z-99'"):
        convert.config_from_open_clip("ViT-Z-99")


def test_load_pretrained_reads_user_files(tmp_path, open_clip_model, hf_model):
    sd = open_clip_model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "oc.pt")
    params, cfg = convert.load_pretrained(tmp_path / "oc.pt", format="open_clip")
    assert cfg == CFG
    assert_state_dicts_equal(convert.to_open_clip(params, cfg), sd)

    from safetensors.torch import save_file

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    hf_model.config.to_json_file(hf_dir / "config.json")
    save_file(hf_model.state_dict(), hf_dir / "model.safetensors")
    params, cfg = convert.load_pretrained(hf_dir / "model.safetensors", format="hf")
    assert replace(cfg, init_logit_scale=CFG.init_logit_scale) == CFG
    assert_state_dicts_equal(
        convert.to_hf(params, cfg), convert.to_hf(convert.from_hf(hf_model.state_dict(), cfg), cfg)
    )


def test_wrong_size_lists_every_mismatched_key(open_clip_model):
    smaller = CLIPConfig(**{**CFG.to_dict(), "image_width": 384, "image_heads": 6})
    with pytest.raises(ConversionError) as err:
        convert.from_open_clip(open_clip_model.state_dict(), smaller)
    message = str(err.value)
    assert (
        "mismatched visual.conv1.weight: expected [384, 3, 16, 16], got [768, 3, 16, 16]" in message
    )
    assert "visual.transformer.resblocks.1.mlp.c_proj.weight" in message
    assert "token_embedding" not in message  # the text tower fits


def test_other_family_or_format_is_named(open_clip_model, hf_model):
    with pytest.raises(ConversionError, match=r"'hf' layout, not 'open_clip'.*format='hf'"):
        convert.from_open_clip(hf_model.state_dict(), CFG)
    bert_like = {"embeddings.word_embeddings.weight": torch.zeros(10, 4)}
    with pytest.raises(ConversionError) as err:
        convert.from_open_clip(bert_like, CFG)
    assert "missing: visual.conv1.weight" in str(err.value)
    assert "unexpected: embeddings.word_embeddings.weight" in str(err.value)
    with pytest.raises(ValueError, match="format must be one of"):
        convert.load_pretrained("x.pt", format="openai")


def test_truncated_file_is_a_clear_error(tmp_path, open_clip_model):
    path = tmp_path / "oc.pt"
    torch.save(open_clip_model.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConversionError, match=r"cannot read weights file .*oc\.pt"):
        convert.load_pretrained(path, format="open_clip")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        convert.load_pretrained(tmp_path / "absent.pt", format="open_clip")


@pytest.mark.slow
def test_full_vit_b16_matches_open_clip():
    oc = reference("open_clip")
    torch.manual_seed(0)
    ref = oc.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    cfg = convert.config_from_open_clip("ViT-B-16-quickgelu")
    params = convert.from_open_clip(ref.state_dict(), cfg)
    images, tokens = inputs(cfg, batch=2)
    with torch.no_grad():
        img, txt, scale = ref(images, tokens)
    assert_same(params, img, txt, scale, images=images, tokens=tokens, cfg=cfg)


@pytest.fixture(scope="module")
def tiny_hf_weights(tmp_path_factory):
    """A tiny CLIP's weights in Hugging Face's layout, alone in a folder."""
    from safetensors.torch import save_file

    from fmm import checks, tree
    from models.clip import clip_tiny

    cfg = clip_tiny()
    folder = tmp_path_factory.mktemp("hf")
    shapes = checks.param_shapes(model.init, cfg)  # values do not matter here: zeros are quick
    sd = convert.to_hf(tree.unflatten({k: torch.zeros(s) for k, s in shapes.items()}), cfg)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    return folder / "model.safetensors", cfg


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (
            {"embed_dim": 64, "vision_cfg": {"layers": 3}, "text_cfg": {"layers": 3}},
            r"open_clip model config.*cfg=config_from_open_clip.*--config.*format='open_clip'",
        ),
        ({"model_type": "bert", "hidden_size": 64}, r"a Hugging Face 'bert' config.*--config"),
        ("fmm", r"an fmm CLIPConfig.*cfg=CLIPConfig"),
        ({"architectures": ["X"]}, r"no CLIP config.*vision_config and text_config"),
        ({"vision_config": {}, "text_config": {}}, r"lacks 'hidden_act'.*--config"),
        ([1, 2], r"holds a JSON list"),
        ("{not json", r"unreadable.*--config"),
    ],
)
def test_a_config_json_of_another_kind_is_named_with_what_to_pass(tiny_hf_weights, content, found):
    weights, cfg = tiny_hf_weights
    beside = weights.with_name("config.json")
    if content == "fmm":
        content = cfg.to_dict()
    beside.write_text(content if isinstance(content, str) else json.dumps(content))
    try:
        with pytest.raises(ConversionError, match=found):
            convert.load_pretrained(weights, format="hf")
    finally:
        beside.unlink()


def test_cfg_overrides_a_config_json_of_another_kind(tiny_hf_weights):
    weights, cfg = tiny_hf_weights
    beside = weights.with_name("config.json")
    beside.write_text(json.dumps({"model_type": "bert"}))
    try:
        params, read = convert.load_pretrained(weights, format="hf", cfg=cfg)
    finally:
        beside.unlink()
    assert read == cfg and params["text"]["token"]["weight"].shape == (64, 128)


# Towers whose MLP ratios differ (4 in the image tower, 2.5 in the text tower), small
# widths in heads of 64 (what config_from_state_dict assumes).
UNEVEN_OPEN_CLIP = dict(
    embed_dim=48, quick_gelu=True,
    vision_cfg=dict(image_size=32, patch_size=8, layers=2, width=128, mlp_ratio=4.0),
    text_cfg=dict(context_length=20, vocab_size=100, width=128, heads=2, layers=2, mlp_ratio=2.5),
)  # fmt: skip


def test_towers_with_different_mlp_widths_match_open_clip():
    oc = reference("open_clip")
    spec = UNEVEN_OPEN_CLIP
    ref = randomize_(
        oc.model.CLIP(spec["embed_dim"], spec["vision_cfg"], spec["text_cfg"], quick_gelu=True),
        seed=4,
    )
    cfg = convert.config_from_open_clip(spec)
    assert (cfg.image_transformer.hidden, cfg.text_transformer.hidden) == (512, 320)
    assert convert.config_from_state_dict(ref.state_dict(), "open_clip") == cfg
    params = convert.from_open_clip(ref.state_dict(), cfg)
    images, tokens = inputs(cfg)
    with torch.no_grad():
        img, txt, scale = ref(images, tokens)
    assert_same(params, img, txt, scale, images=images, tokens=tokens, cfg=cfg)
    assert_state_dicts_equal(convert.to_open_clip(params, cfg), ref.state_dict())
    assert CLIPConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_towers_with_different_mlp_widths_match_hf():
    import transformers

    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=128, intermediate_size=320,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=20,
                         bos_token_id=98, eos_token_id=99),  # inputs()' start and end ids
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=48,
    )  # fmt: skip
    ref = randomize_(transformers.CLIPModel(config), seed=5)
    cfg = convert.config_from_hf(config)
    assert (cfg.image_mlp_dim, cfg.text_mlp_dim) == (512, 320)
    assert replace(convert.config_from_state_dict(ref.state_dict(), "hf"),
                   init_logit_scale=cfg.init_logit_scale) == cfg  # fmt: skip
    params = convert.from_hf(ref.state_dict(), cfg)
    images, tokens = inputs(cfg)
    with torch.no_grad():
        out = ref(input_ids=tokens, pixel_values=images)
    scale = ref.logit_scale.exp()
    assert_same(params, out.image_embeds, out.text_embeds, scale, images=images, tokens=tokens,
                cfg=cfg)  # fmt: skip
