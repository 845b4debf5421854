"""CLIP with a video tower (``CLIPConfig.frames``): the tower's shapes, and the family
contract's laws run on ``clip_video_tiny`` (the contract suite itself runs each family's
smallest preset, ``clip_tiny``, whose goldens the video option leaves alone)."""

from __future__ import annotations

import pytest
import torch

from models import clip

# The contract's laws, collected here again against the `case` fixture below.
from tests.test_family_contract import (  # noqa: F401
    Case,
    test_a_batch_without_a_declared_field_is_refused_by_name,
    test_embeddings_do_not_depend_on_the_rest_of_the_batch,
    test_init_is_a_pure_function_of_the_key,
    test_meta_init_gives_the_shapes_of_real_init_and_allocates_nothing,
    test_the_adapter_equals_the_pure_loss_and_checkpointing_changes_no_grad_bit,
    test_the_loss_compiles_as_one_graph_and_does_not_recompile,
    test_the_loss_runs_on_its_declared_batch_and_returns_scalar_metrics,
)

SMALL = dict(image_width=32, image_layers=1, image_heads=2, text_width=32, text_layers=1,
             text_heads=2, embed_dim=16)  # fmt: skip


@pytest.fixture(scope="module")
def case() -> Case:
    """The contract's case on ``clip_video_tiny``, its towers narrowed so the laws run fast."""
    return Case(
        "clip", "clip_video_tiny", clip.CLIPConfig(**(clip.clip_video_tiny().to_dict() | SMALL))
    )


def test_the_video_tower_takes_clips_and_gives_one_token_per_tube(case):
    cfg, params = case.cfg, case.params
    assert cfg.image_tower.seq == 4 * 4 * 4 + 1  # 8 frames / 2 x (32 / 8)² tubes, cls
    assert params["image"]["patch"]["weight"].shape == (32, 3, 2, 8, 8)
    assert params["image"]["pos"].shape == (65, 32)
    videos = torch.rand(3, 3, 8, 32, 32)
    assert clip.image_features(params, videos, cfg=cfg).shape == (3, 65, 32)
    emb = clip.encode_image(params, videos, cfg=cfg)
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert clip.image_shape(cfg) == (3, 8, 32, 32)


def test_the_video_tower_sees_time(case):
    """Reversing a clip's frames changes its embedding: tubes have positions in time."""
    videos = torch.rand(2, 3, 8, 32, 32)
    fwd = clip.encode_image(case.params, videos, cfg=case.cfg)
    back = clip.encode_image(case.params, videos.flip(2), cfg=case.cfg)
    assert (fwd - back).abs().max() > 1e-3


def test_images_are_refused_by_a_video_tower_by_name(case):
    with pytest.raises(ValueError, match="images"):
        clip.encode_image(case.params, torch.rand(2, 3, 32, 32), cfg=case.cfg)


def test_frames_must_be_a_multiple_of_the_tubelet():
    with pytest.raises(ValueError, match="tubelet"):
        clip.CLIPConfig(**(clip.clip_video_tiny().to_dict() | {"frames": 7}))


def test_foreign_layouts_refuse_a_video_tower(case):
    with pytest.raises(ValueError, match="video tower"):
        clip.to_open_clip(case.params, case.cfg)


def test_image_clip_is_unchanged_by_the_option():
    """clip_tiny's tower has no time axis and its params keep their shapes."""
    cfg = clip.clip_tiny()
    assert cfg.frames is None and cfg.image_tower.seq == 65
    assert clip.image_shape(cfg) == (3, 32, 32)
