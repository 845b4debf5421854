"""Omnivore: parity with TorchMultimodal's Omnivore on identical random weights, the
converters' round trip and error list, images as one-frame videos, bad input by name, and
stochastic depth (TorchMultimodal's per-block schedule; training a function of the key)."""

import dataclasses

import pytest
import torch
from torch import nn

import fmm
from fmm.convert import ConversionError
from models import omnivore
from models.omnivore import OmnivoreConfig
from tests.reference import reference


def reference_model(cfg: OmnivoreConfig) -> nn.Module:
    """TorchMultimodal's Omnivore built as its ``omnivore_swin_*`` builders do, at ``cfg``."""
    tmm = reference("torchmultimodal.models.omnivore")
    swin = reference("torchmultimodal.modules.encoders.swin_transformer_3d_encoder")
    encoder = swin.SwinTransformer3d(
        patch_size=list(cfg.patch),
        embed_dim=cfg.dim,
        depths=list(cfg.depths),
        num_heads=list(cfg.num_heads),
        window_size=list(cfg.window),
        stochastic_depth_prob=cfg.stochastic_depth,
        norm_layer=nn.LayerNorm,
        patch_embed=tmm.PatchEmbedOmnivore,
        num_classes=None,
    )
    heads = nn.ModuleDict(
        {
            name: nn.Sequential(nn.Dropout(0.5), nn.Linear(cfg.features, n))
            if modality == "video"
            else nn.Linear(cfg.features, n)
            for name, n, modality in cfg.heads
        }
    )
    return tmm.Omnivore(encoder, heads).eval()


def _randomise(model: nn.Module) -> None:
    # Norms start at ones/zeros and the bias table near zero: draw everything so parity
    # sees every weight.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "relative_position" in name else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * scale + ("norm" in name))


REDUCED = omnivore.omnivore_tiny(
    dim=24, depths=(2, 2, 1), num_heads=(2, 2, 4), window=(2, 3, 3), image_size=24, frames=6
)


@pytest.fixture(scope="module")
def converted():
    ref = reference_model(REDUCED)
    _randomise(ref)
    return ref, omnivore.from_torchmultimodal(ref.state_dict(), REDUCED)


@pytest.mark.parametrize(
    "modality, shape",
    [
        ("video", (2, 3, 6, 24, 24)),
        ("image", (2, 3, 1, 24, 24)),
        ("rgbd", (2, 4, 1, 24, 24)),
        ("video", (1, 3, 5, 26, 18)),  # sizes that pad patches and windows
    ],
)
def test_outputs_match_torchmultimodal(converted, modality, shape):
    ref, params = converted
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = ref(x, modality)
    ours = omnivore.classify(params, x, modality, cfg=REDUCED)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        omnivore.encode(params, x, cfg=REDUCED), ref.encoder(x), atol=1e-5, rtol=1e-5
    )


def test_an_image_is_a_one_frame_video(converted):
    _, params = converted
    image = torch.rand(2, 4, 24, 24)
    torch.testing.assert_close(
        omnivore.encode(params, image, cfg=REDUCED),
        omnivore.encode(params, image[:, :, None], cfg=REDUCED),
    )


def test_round_trip_and_strict_load(converted):
    ref, params = converted
    sd = omnivore.to_torchmultimodal(params, REDUCED)
    fresh = reference_model(REDUCED)
    fresh.load_state_dict(sd, strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k], v), k
    again = omnivore.from_torchmultimodal(sd, REDUCED)
    assert fmm.tree.flatten(again).keys() == fmm.tree.flatten(params).keys()


def test_a_bad_state_dict_lists_every_problem(converted):
    ref, _ = converted
    sd = dict(ref.state_dict())
    del sd["encoder.norm.weight"]
    sd["encoder.extra"] = torch.zeros(1)
    sd["heads.image.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConversionError) as err:
        omnivore.from_torchmultimodal(sd, REDUCED)
    text = str(err.value)
    assert "missing: encoder.norm.weight" in text
    assert "unexpected: encoder.extra" in text
    assert "mismatched heads.image.weight" in text


def test_bad_inputs_are_refused_by_name():
    cfg = omnivore.omnivore_tiny()
    params = omnivore.init(cfg, fmm.random.key(0))
    with pytest.raises(ValueError, match="x must have"):
        omnivore.encode(params, torch.rand(2, 5, 16, 16), cfg=cfg)
    with pytest.raises(ValueError, match="head must be one of"):
        omnivore.classify(params, torch.rand(2, 3, 16, 16), "audio", cfg=cfg)
    batch = fmm_batch(cfg)
    batch["rgbd"] = torch.rand(3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"batch\['rgbd'\]"):
        omnivore.loss(params, batch, cfg=cfg)
    with pytest.raises(ValueError, match="modality"):
        omnivore.omnivore_tiny(heads=(("x", 3, "audio"),))


def fmm_batch(cfg):
    from models.family import example_batch

    return example_batch(omnivore.batch_fields(cfg), fmm.random.key(0))


def test_the_loss_trains_every_head():
    cfg = omnivore.omnivore_tiny()
    params = omnivore.init(cfg, fmm.random.key(0))
    key = fmm.random.key(1)  # the blocks' drop path
    value, metrics = omnivore.loss(params, fmm_batch(cfg), cfg=cfg, key=key)
    assert {f"{n}_accuracy" for n, _, _ in cfg.heads} <= metrics.keys()
    leaves = fmm.tree.flatten(params)
    for leaf in leaves.values():
        leaf.requires_grad_(True)
    value, _ = omnivore.loss(fmm.tree.unflatten(leaves), fmm_batch(cfg), cfg=cfg, key=key)
    value.backward()
    assert all(leaf.grad is not None for leaf in leaves.values())


@pytest.mark.parametrize("preset", ["omnivore_swin_t", "omnivore_swin_s", "omnivore_swin_b"])
def test_the_drop_path_schedule_is_torchmultimodals(preset):
    tmm = reference("torchmultimodal.models.omnivore")
    with torch.device("meta"):  # the schedule only: no weights
        encoder = getattr(tmm, f"{preset}_encoder")()
    theirs = [b.stochastic_depth.p for stage in encoder.features[::2] for b in stage]
    cfg = omnivore.PRESETS[preset]()
    ours = [cfg.block(i, j).drop_path for i, d in enumerate(cfg.depths) for j in range(d)]
    assert ours == theirs
    assert sum(cfg.drop_path_rates(), ()) == tuple(theirs)


def test_drop_path_in_training_is_a_function_of_the_key():
    """Same key, same loss and grads; another key, another loss; rate 0 and eval are
    deterministic without one. TorchMultimodal's drop path draws from the global RNG, so
    its training outputs cannot be compared draw for draw (eval parity is tested above)."""
    cfg = omnivore.omnivore_tiny(stochastic_depth=0.5)
    params, batch = omnivore.init(cfg, fmm.random.key(0)), fmm_batch(cfg)

    def loss_and_grad(key):
        value, _ = omnivore.loss(live, batch, cfg=cfg, key=key)
        return value.detach(), torch.autograd.grad(value, fmm.tree.leaves(live))

    live = fmm.tree.map(lambda t: t.detach().requires_grad_(True), params)
    a, ga = loss_and_grad(fmm.random.key(1))
    b, gb = loss_and_grad(fmm.random.key(1))
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    with torch.no_grad():
        assert not torch.equal(a, omnivore.loss(params, batch, cfg=cfg, key=fmm.random.key(2))[0])
        still = omnivore.loss(params, batch, cfg=cfg, train=False)[0]
        off = dataclasses.replace(cfg, stochastic_depth=0.0)
        torch.testing.assert_close(omnivore.loss(params, batch, cfg=off)[0], still)
    with pytest.raises(ValueError, match="key= is missing"):
        omnivore.loss(params, batch, cfg=cfg)
    with pytest.raises(ValueError, match="stochastic_depth"):
        omnivore.omnivore_tiny(stochastic_depth=1.0)


@pytest.mark.slow
def test_full_swin_t_matches_torchmultimodal():
    tmm = reference("torchmultimodal.models.omnivore")
    ref = tmm.omnivore_swin_t().eval()
    _randomise(ref)
    cfg = omnivore.omnivore_swin_t()
    params = omnivore.from_torchmultimodal(ref.state_dict(), cfg)
    x = torch.rand(1, 3, 4, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = ref(x, "video")
    ours = omnivore.classify(params, x, "video", cfg=cfg)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
