"""The ADM U-Net and the DALL-E 2 decoder: parity with TorchMultimodal's ``ADMUNet`` and
``dalle2_decoder`` on identical random weights, the converters' round trips and error
lists, and the laws of the pieces (timestep features, group norm, conditioned attention).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import fmm
import models
from fmm.convert import ConversionError
from fmm.diffusion.losses import diffusion_loss
from fmm.diffusion.predict import split_output
from fmm.diffusion.transforms import classifier_free_guidance
from fmm.nn.norm import group_norm, init_group_norm
from models import clip
from models.adm import convert, dalle2, layers, unet
from models.adm.config import ADMConfig, adm_tiny, dalle2_tiny
from tests.reference import reference

ATOL = 1e-5


def _tmm_unet(cfg: ADMConfig):
    adm = reference("torchmultimodal.diffusion_labs.models.adm_unet.adm")
    cond = cfg.embed_dim is not None
    model = adm.ADMUNet(
        channels_per_layer=list(cfg.channels), num_resize=cfg.num_resize,
        num_res_per_layer=cfg.res_blocks, use_attention_for_layer=list(cfg.attention),
        dim_res_cond=cfg.cond_dim, dim_attn_cond=cfg.cond_dim if cond else None,
        embed_dim=cfg.embed_dim, embed_name=cfg.cond_key, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, time_embed_dim=cfg.time_embed_dim,
        predict_variance_value=cfg.learned_variance, variance_value_transform=lambda v: (v + 1) / 2,
    )  # fmt: skip
    return _randomised(model)


def _tmm_dalle2(cfg: ADMConfig, guidance: float = 0.0):
    dalle2_decoder = reference("torchmultimodal.diffusion_labs.models.dalle2.dalle2_decoder")
    model = dalle2_decoder.dalle2_decoder(
        timesteps=cfg.timesteps, time_embed_dim=cfg.time_embed_dim, cond_embed_dim=cfg.cond_dim,
        clip_embed_dim=cfg.embed_dim, clip_embed_name=cfg.cond_key,
        image_channels=cfg.in_channels, depth=cfg.channels[0], num_resize=cfg.num_resize,
        num_res_per_layer=cfg.res_blocks, guidance_strength=guidance,
    )  # fmt: skip
    return _randomised(model)


def _randomised(model):
    # Non-trivial norms and biases too, so a swapped or dropped leaf shows.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def _inputs(cfg: ADMConfig, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([0, 517, cfg.timesteps - 1][:batch])
    c = None if cfg.embed_dim is None else torch.randn(batch, cfg.embed_dim, generator=g)
    return x, t, c


@pytest.mark.parametrize(
    "cfg",
    [adm_tiny(), adm_tiny(embed_dim=16), adm_tiny(learned_variance=False, res_blocks=2)],
    ids=["unconditional", "conditioned", "fixed-variance-2-blocks"],
)
def test_unet_equals_torchmultimodal_admunet_on_identical_weights(cfg):
    model = _tmm_unet(cfg)
    params = convert.from_torchmultimodal(model.state_dict(), cfg)
    x, t, c = _inputs(cfg)
    cond = None if c is None else {cfg.cond_key: c}
    with torch.no_grad():
        want = model(x, t, cond)
        got = unet.apply(params, x, t, cond, cfg=cfg)
    prediction, variance = split_output(got, learned_variance=cfg.learned_variance)
    torch.testing.assert_close(prediction, want.prediction, atol=ATOL, rtol=ATOL)
    if cfg.learned_variance:
        torch.testing.assert_close(variance, want.variance_value, atol=ATOL, rtol=ATOL)
    # The export loads strictly and the round trip is exact.
    model.load_state_dict(convert.to_torchmultimodal(params, cfg))
    again = convert.from_torchmultimodal(model.state_dict(), cfg)
    assert all(torch.equal(a, b) for a, b in zip(fmm.tree.leaves(params), fmm.tree.leaves(again)))


def test_dalle2_decoder_equals_torchmultimodal_with_and_without_a_condition():
    cfg = dalle2_tiny()
    model = _tmm_dalle2(cfg)
    params = convert.from_torchmultimodal(model.state_dict(), cfg)
    x, t, c = _inputs(cfg)
    cfguidance = model.model  # CFGuidance(ADMUNet): guidance 0 runs the model as it is
    with torch.no_grad():
        for cond in ({cfg.cond_key: c}, None):
            want = cfguidance(x, t, cond)
            got, _ = split_output(unet.apply(params, x, t, cond, cfg=cfg), learned_variance=True)
            torch.testing.assert_close(got, want.prediction, atol=ATOL, rtol=ATOL)
    model.load_state_dict(convert.to_torchmultimodal(params, cfg))


def test_guidance_over_the_unet_equals_torchmultimodal_cfguidance():
    cfg, w = dalle2_tiny(), 3.0
    model = _tmm_dalle2(cfg, guidance=w)
    params = convert.from_torchmultimodal(model.state_dict(), cfg)
    x, t, c = _inputs(cfg)
    guided = classifier_free_guidance(
        functools.partial(unet.apply, cfg=cfg), 1.0 + w, learned_variance=True,
        null=functools.partial(unet.null_condition, cfg=cfg),
    )  # fmt: skip
    with torch.no_grad():
        want = model.model(x, t, {cfg.cond_key: c})
        got = split_output(guided(params, x, t, {cfg.cond_key: c}), learned_variance=True)
    torch.testing.assert_close(got[0], want.prediction, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(got[1], want.variance_value, atol=ATOL, rtol=ATOL)


def test_the_converter_lists_every_missing_unexpected_and_misshapen_key():
    cfg = adm_tiny(embed_dim=16)
    sd = convert.to_torchmultimodal(unet.init(cfg, fmm.random.key(0)), cfg)
    sd.pop("timestep_encoder.1.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["inp_is_wrong"] = sd.pop("down.0._module_list.0.bias")[:-1]
    with pytest.raises(ConversionError) as err:
        convert.from_torchmultimodal(sd, cfg)
    text = str(err.value)
    for piece in ("missing: timestep_encoder.1.weight", "missing: down.0._module_list.0.bias",
                  "unexpected: extra.weight", "unexpected: inp_is_wrong"):  # fmt: skip
        assert piece in text


def test_timestep_features_equal_torchmultimodal_sinusoids():
    position = reference("torchmultimodal.modules.layers.position_embedding")
    t = torch.tensor([0, 1, 17, 500, 999])
    for dim in (32, 33):
        want = position.SinusoidalPositionEmbeddings(embed_dim=dim)(t)
        assert torch.equal(layers.timestep_features(t, dim), want)


def test_group_norm_normalises_per_group_in_at_least_float32():
    x = torch.randn(2, 8, 5, 3)
    p = {"weight": torch.randn(8), "bias": torch.randn(8)}
    torch.testing.assert_close(
        group_norm(p, x, groups=4), torch.nn.functional.group_norm(x, 4, **p)
    )
    half = group_norm(init_group_norm(8), (x * 100).half(), groups=2)
    assert half.dtype == torch.float16
    torch.testing.assert_close(
        half.float(), group_norm(init_group_norm(8), (x * 100).half().float(), groups=2),
        atol=1e-2, rtol=1e-3,
    )  # fmt: skip
    double = group_norm(p, x.double(), groups=4)  # float64 is kept, not cast down
    assert double.dtype == torch.float64
    torch.testing.assert_close(
        double,
        torch.nn.functional.group_norm(x.double(), 4, p["weight"].double(), p["bias"].double()),
    )
    with pytest.raises(ValueError, match="divisible by groups=3"):
        group_norm(p, x, groups=3)


def test_group_norm_compiled_takes_per_channel_statistics_to_the_same_values():
    # Compiled, group_norm reduces per channel and averages groups by a matmul (inductor's
    # channels-last layout); values and gradients match F.group_norm's, bias or none.
    x = (torch.randn(2, 8, 5, 3) * 3 + 2).requires_grad_()
    p = {"weight": torch.randn(8), "bias": torch.randn(8)}
    for params in (p, {"weight": p["weight"]}):
        compiled = torch.compile(
            lambda x, params=params: group_norm(params, x, groups=4), backend="aot_eager"
        )
        want = torch.nn.functional.group_norm(x, 4, params["weight"], params.get("bias"))
        got = compiled(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        (grad_got,) = torch.autograd.grad(got.square().sum(), x)
        (grad_want,) = torch.autograd.grad(want.square().sum(), x)
        torch.testing.assert_close(grad_got, grad_want, atol=1e-5, rtol=1e-5)
    half = torch.compile(lambda x: group_norm(p, x, groups=2), backend="aot_eager")
    assert half(x.detach().half()).dtype == torch.float16


def test_conditioned_attention_sees_the_tokens_and_the_tokens_see_nothing():
    # Each pixel attends over [tokens; pixels]: with tokens whose values dominate, the output
    # moves; the same block without tokens is plain self-attention over the pixels.
    block = layers.init_attention_block(32, fmm.random.key(0), heads=2, cond_dim=8)
    x = torch.randn(2, 32, 4, 4)
    plain = layers.attention_block(block, x, heads=2, groups=8, eps=1e-5)
    tokens = torch.randn(2, 3, 8)
    with_tokens = layers.attention_block(block, x, tokens, heads=2, groups=8, eps=1e-5)
    assert not torch.allclose(plain, with_tokens)
    # Batch independence: each row depends on its own tokens only.
    one = layers.attention_block(block, x[1:], tokens[1:], heads=2, groups=8, eps=1e-5)
    torch.testing.assert_close(one, with_tokens[1:])


def test_unet_rows_are_independent_and_dropout_needs_a_key():
    cfg = dalle2_tiny()
    params = unet.init(cfg, fmm.random.key(0))
    x, t, c = _inputs(cfg)
    whole = unet.apply(params, x, t, {cfg.cond_key: c}, cfg=cfg)
    part = unet.apply(params, x[1:2], t[1:2], {cfg.cond_key: c[1:2]}, cfg=cfg)
    torch.testing.assert_close(part, whole[1:2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="key= is missing"):
        unet.apply(params, x, t, None, cfg=cfg, train=True)
    drawn = unet.apply(params, x, t, None, cfg=cfg, train=True, key=fmm.random.key(1))
    assert not torch.allclose(drawn, unet.apply(params, x, t, None, cfg=cfg))


def test_bad_inputs_are_refused_by_name():
    cfg = adm_tiny(embed_dim=16)
    params = unet.init(cfg, fmm.random.key(0))
    x, t, c = _inputs(cfg, batch=2)
    with pytest.raises(ValueError, match="x_t"):
        unet.apply(params, x[:, :2], t, {"context": c}, cfg=cfg)
    with pytest.raises(ValueError, match="divisible by 2"):
        unet.apply(params, x[..., :15], t, {"context": c}, cfg=cfg)
    with pytest.raises(ValueError, match=r"^t "):
        unet.apply(params, x, t[:1], {"context": c}, cfg=cfg)
    with pytest.raises(ValueError, match="cond must hold 'context'"):
        unet.apply(params, x, t, None, cfg=cfg)
    with pytest.raises(ValueError, match="cond\\['context'\\]"):
        unet.apply(params, x, t, {"context": c[:, :3]}, cfg=cfg)
    with pytest.raises(ValueError, match="key= is missing"):
        unet.loss(params, {"images": x, "context": c}, cfg=cfg)
    with pytest.raises(ValueError, match="not divisible by groups"):
        ADMConfig(channels=(48, 64), attention=(False, True), image_size=16)
    with pytest.raises(ValueError, match="prediction must be one of"):
        adm_tiny(prediction="eps")
    with pytest.raises(ValueError, match="snr_gamma must be > 0"):
        adm_tiny(snr_gamma=0.0)


def test_loss_trains_the_configured_prediction_under_its_weighting():
    cfg = adm_tiny(embed_dim=16, learned_variance=False, dropout=0.0)
    params = unet.init(cfg, fmm.random.key(0))
    x, _, c = _inputs(cfg)
    batch, key = {"images": x.clamp(-1, 1), "context": c}, fmm.random.key(3)
    for prediction, gamma in (("noise", None), ("v", 5.0), ("x0", 1.0)):
        chosen = dataclasses.replace(cfg, prediction=prediction, snr_gamma=gamma)
        got, _ = unet.loss(params, batch, cfg=chosen, key=key, train=False)
        want, _ = diffusion_loss(
            functools.partial(unet.apply, cfg=chosen), params, batch["images"],
            fmm.random.fold_in(key, "diffusion"), {"context": c}, schedule=unet.schedule(cfg),
            prediction=prediction, snr_gamma=gamma,
        )  # fmt: skip
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_loss_drops_conditions_only_in_training():
    cfg = dalle2_tiny(cond_dropout=0.5)
    params = unet.init(cfg, fmm.random.key(0))
    x, _, c = _inputs(cfg)
    batch, key = {"images": x.clamp(-1, 1), cfg.cond_key: c}, fmm.random.key(2)
    trained, _ = unet.loss(params, batch, cfg=cfg, key=key, train=True)
    evaluated, _ = unet.loss(params, batch, cfg=cfg, key=key, train=False)
    undropped, _ = unet.loss(params, batch, cfg=dalle2_tiny(cond_dropout=0.0), key=key, train=False)
    torch.testing.assert_close(evaluated, undropped)
    assert not torch.allclose(trained, evaluated)


def test_clip_condition_embeds_images_with_fmm_clip():
    clip_cfg = clip.clip_tiny()
    clip_params = clip.init(clip_cfg, fmm.random.key(0))
    images = torch.rand(2, 3, 32, 32)
    cond = dalle2.clip_condition(clip_params, images, clip_cfg=clip_cfg, cfg=dalle2_tiny())
    want = clip.encode_image(clip_params, images, cfg=clip_cfg)
    torch.testing.assert_close(cond["clip_image"], want)
    assert not cond["clip_image"].requires_grad
    with pytest.raises(ValueError, match="embed_dim=64 is not the decoder's embed_dim=16"):
        dalle2.clip_condition(clip_params, images, clip_cfg=clip_cfg, cfg=dalle2_tiny(embed_dim=16))


def test_a_guided_sampler_step_over_the_unet_compiles_once_and_equals_eager():
    import torch._dynamo.testing

    from fmm import diffusion as fd

    cfg = dalle2_tiny()
    params = unet.init(cfg, fmm.random.key(0))
    s = fd.spaced(unet.schedule(cfg), 3)
    guided = classifier_free_guidance(
        functools.partial(unet.apply, cfg=cfg), 4.0, learned_variance=True,
        null=functools.partial(unet.null_condition, cfg=cfg),
    )  # fmt: skip
    eager = functools.partial(fd.ddpm_step, guided, schedule=s, learned_variance=True, clip=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = fd.compile_step(eager, backend=counter)
    x, key = fmm.random.normal(fmm.random.key(1), (2, 3, 16, 16)), fmm.random.key(2)
    cond = {cfg.cond_key: torch.randn(2, cfg.embed_dim)}
    with torch.no_grad():
        compiled = fd.sample(step, params, x, key, cond, steps=s.steps)
        want = fd.sample(eager, params, x, key, cond, steps=s.steps)
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["adm_unet", "dalle2_decoder"])
def test_the_published_presets_have_torchmultimodals_keys_and_shapes(preset):
    # Built on the meta device on both sides: the 2.2 B-param layouts without the memory.
    cfg = models.get_config(preset)
    if preset == "adm_unet":
        build = reference("torchmultimodal.diffusion_labs.models.adm_unet.adm").adm_unet
    else:
        build = reference(
            "torchmultimodal.diffusion_labs.models.dalle2.dalle2_decoder"
        ).dalle2_decoder
    with torch.device("meta"):
        theirs = build().state_dict()
    ours = convert.to_torchmultimodal(convert.from_torchmultimodal(theirs, cfg), cfg)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
