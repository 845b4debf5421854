"""CLIP with an audio tower (``clap_tiny``: a ``(frames, mels)`` ``image_size``, one channel):
the tower's shapes, its bad inputs, the rectangular ViT against the square one, and the
family contract's laws run on it (the contract suite runs ``clip_tiny``, the family's
smallest preset, whose goldens the audio option leaves alone). The compile law is left to
the contract suite: the audio tower runs the same graph as the image tower, another conv
shape."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import fmm
from fmm.nn import TransformerConfig, towers
from models import clip

# The contract's laws, collected here again against the `case` fixture below.
from tests.test_family_contract import (  # noqa: F401
    Case,
    test_embeddings_do_not_depend_on_the_rest_of_the_batch,
    test_init_is_a_pure_function_of_the_key,
    test_the_adapter_equals_the_pure_loss_and_checkpointing_changes_no_grad_bit,
    test_the_loss_runs_on_its_declared_batch_and_returns_scalar_metrics,
)

SMALL = dict(image_width=32, image_layers=1, image_heads=2, text_width=32, text_layers=1,
             text_heads=2, embed_dim=16)  # fmt: skip


@pytest.fixture(scope="module")
def case() -> Case:
    """The contract's case on ``clap_tiny``, its towers narrowed so the laws run fast."""
    return Case("clip", "clap_tiny", clip.CLIPConfig(**(clip.clap_tiny().to_dict() | SMALL)))


def test_the_audio_tower_takes_spectrograms_and_gives_one_token_per_patch(case):
    cfg, params = case.cfg, case.params
    assert cfg.image_tower.grid_shape == (8, 4) and cfg.image_tower.seq == 33
    assert params["image"]["patch"]["weight"].shape == (32, 1, 8, 8)
    assert params["image"]["pos"].shape == (33, 32)
    specs = torch.randn(3, 1, 64, 32)
    assert clip.image_features(params, specs, cfg=cfg).shape == (3, 33, 32)
    emb = clip.encode_image(params, specs, cfg=cfg)
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert clip.image_shape(cfg) == (1, 64, 32)


def test_the_published_size_preset_is_a_vit_b16_over_audiomae_fbanks():
    cfg = clip.clap_vit_b16()
    assert clip.image_shape(cfg) == (1, 1024, 128)
    assert cfg.image_tower.grid_shape == (64, 8) and cfg.image_tower.seq == 513
    assert (cfg.image_width, cfg.image_layers, cfg.text_width, cfg.context_length) == (
        768, 12, 512, 77
    )  # fmt: skip


def test_the_audio_tower_tells_time_from_frequency(case):
    """Patches have positions on both axes: a spectrogram shifted in time by a patch is not
    the same input to the tower."""
    specs = torch.randn(2, 1, 64, 32)
    a = clip.encode_image(case.params, specs, cfg=case.cfg)
    b = clip.encode_image(case.params, specs.roll(8, dims=2), cfg=case.cfg)
    assert (a - b).abs().max() > 1e-3


def test_bad_spectrograms_are_refused_naming_the_argument(case):
    cfg, params = case.cfg, case.params
    for bad in (torch.randn(2, 1, 32, 64), torch.randn(2, 3, 64, 32), torch.randn(1, 64, 32)):
        with pytest.raises(ValueError, match="images"):
            clip.encode_image(params, bad, cfg=cfg)
    with pytest.raises(TypeError, match="images"):
        clip.encode_image(params, torch.randn(2, 1, 64, 32, dtype=torch.float64), cfg=cfg)


@pytest.mark.parametrize("size", [(60, 32), (64, 0), (64,), (64, 32, 8)])
def test_a_bad_rectangular_size_is_refused_naming_image_size(size):
    stack = TransformerConfig(width=16, layers=1, heads=2)
    with pytest.raises(ValueError, match="image_size"):
        towers.ViTConfig(image_size=size, patch_size=8, transformer=stack)
    if len(size) == 2:
        with pytest.raises(ValueError, match="image_size"):
            dataclasses.replace(clip.clap_tiny(), image_size=size)


def test_a_rectangular_tower_has_no_single_grid_side():
    with pytest.raises(ValueError, match="grid_shape"):
        clip.clap_tiny().image_tower.grid


def test_foreign_layouts_refuse_the_audio_tower(case):
    for to in (clip.convert.config_to_hf, clip.convert.config_to_open_clip):
        with pytest.raises(ValueError, match="image_size"):
            to(case.cfg)
    with pytest.raises(ValueError, match="image_size"):
        clip.to_open_clip(case.params, cfg=case.cfg)


def test_the_config_survives_a_json_round_trip_as_a_pair():
    cfg = clip.clap_tiny()
    back = clip.CLIPConfig(**json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.image_size == (64, 32)


@pytest.mark.parametrize("frames", [None, 4])
def test_a_square_pair_is_the_square_tower_bit_for_bit(frames):
    """``image_size=(s, s)`` builds the same params as ``image_size=s`` from one key and gives
    the same outputs exactly, for an image and a video tower."""
    stack = TransformerConfig(width=24, layers=2, heads=2)
    video = {} if frames is None else {"frames": frames, "tubelet": 2}
    square = towers.ViTConfig(image_size=12, patch_size=4, transformer=stack, **video)
    pair = dataclasses.replace(square, image_size=(12, 12))
    assert pair.seq == square.seq == (frames or 2) // 2 * 9 + 1
    key = fmm.random.key(3)
    p_square, p_pair = towers.init_vit(square, key), towers.init_vit(pair, key)
    flat = fmm.tree.flatten(p_square)
    assert flat.keys() == fmm.tree.flatten(p_pair).keys()
    assert all(torch.equal(flat[k], v) for k, v in fmm.tree.flatten(p_pair).items())
    x = torch.randn(2, 3, *([] if frames is None else [frames]), 12, 12)
    a, b = towers.vit(p_square, x, cfg=square), towers.vit(p_pair, x, cfg=pair)
    assert torch.equal(a.sequence, b.sequence) and torch.equal(a.hidden, b.hidden)


def test_a_square_pair_clip_embeds_as_the_square_clip_bit_for_bit():
    cfg = clip.CLIPConfig(**(clip.clip_tiny().to_dict() | SMALL))
    pair = dataclasses.replace(cfg, image_size=(32, 32))
    params = clip.init(cfg, fmm.random.key(0))
    images = torch.rand(2, 3, 32, 32)
    assert clip.image_shape(pair) == clip.image_shape(cfg)
    assert torch.equal(
        clip.encode_image(params, images, cfg=pair), clip.encode_image(params, images, cfg=cfg)
    )
