"""The moving-shapes world and its RGB-D scenes: shapes, determinism, held-out pairs, motion."""

import pytest
import torch

from train.data.video_shapes import (
    VideoWorldConfig,
    clip_eval_set,
    clip_stream,
    depth_stream,
    is_holdout_motion,
    sample_clips,
    sample_depth_scenes,
    vocabulary,
)

CFG = VideoWorldConfig(image_size=32, frames=8)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_clips_shapes_range_and_determinism():
    a, b = next(clip_stream(CFG, 16, seed=3)), next(clip_stream(CFG, 16, seed=3))
    assert a.videos.shape == (16, 3, 8, 32, 32) and a.videos.dtype == torch.float32
    assert a.videos.min() >= 0 and a.videos.max() <= 1
    assert torch.equal(a.videos, b.videos) and a.captions == b.captions
    words = set(vocabulary(CFG))
    assert all(set(c.split()) <= words for c in a.captions)


def test_train_split_never_holds_out_and_eval_covers_every_pair():
    clips = sample_clips(CFG, 1000, generator=_gen())
    assert not is_holdout_motion(CFG, clips.motions, clips.shapes).any()
    ev = clip_eval_set(CFG, 2, seed=1)
    pairs = ev.motions * len(CFG.shapes) + ev.shapes
    assert pairs.unique().numel() == len(CFG.motions) * len(CFG.shapes)
    assert is_holdout_motion(CFG, ev.motions, ev.shapes).sum() == 2 * len(CFG.holdout)


def _centroid(video):  # video [3, T, H, W] -> x, y [T] of the brightest pixels
    mask = (video.max(0).values > 0.3).float()
    grid = torch.arange(video.shape[-1], dtype=torch.float32)
    area = mask.sum((1, 2))
    return (mask.sum(1) * grid).sum(-1) / area, (mask.sum(2) * grid).sum(-1) / area, area


def test_motion_matches_caption():
    ev = clip_eval_set(VideoWorldConfig(p_stop=0.0), 3, seed=2)
    for video, caption in zip(ev.videos, ev.captions):
        x, y, area = _centroid(video)
        if "moves left" in caption:
            assert x[-1] < x[0] - 8
        elif "moves down" in caption:
            assert y[-1] > y[0] + 8
        elif "grows" in caption:
            assert area[-1] > 2 * area[0]
        elif "shrinks" in caption:
            assert area[-1] < area[0] / 2


def test_then_stops_holds_the_second_half():
    clips = sample_clips(VideoWorldConfig(p_stop=1.0), 8, generator=_gen())
    assert all(c.endswith("then stops") for c in clips.captions)
    # Past the middle frame only the object stops changing; the background never changes.
    assert torch.equal(clips.videos[:, :, 3], clips.videos[:, :, -1])
    assert not torch.equal(clips.videos[:, :, 0], clips.videos[:, :, 3])


def test_depth_scenes_nearest_object_in_front():
    s = next(depth_stream(CFG, 64, seed=0))
    assert s.images.shape == (64, 3, 32, 32) and s.depth.shape == (64, 1, 32, 32)
    assert s.depth.max() == 1 and s.depth.min() > 0
    # Omnivore's RGB-D input: depth as a fourth channel of a one-frame video.
    rgbd = torch.cat([s.images, s.depth], 1)[:, :, None]
    assert rgbd.shape == (64, 4, 1, 32, 32)
    b = sample_depth_scenes(CFG, 64, generator=_gen(0))
    assert torch.equal(b.depth, s.depth) and b.captions[0].count(" in front of ") == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"frames": 1}, "frames"),
        ({"motions": ("left", "spin")}, "motions"),
        ({"holdout": (("left", "star"),)}, "holdout"),
        ({"p_stop": 2.0}, "p_stop"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VideoWorldConfig(**kwargs)


def test_bad_batch_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        sample_clips(CFG, 0, generator=_gen())
    with pytest.raises(ValueError, match="split"):
        sample_depth_scenes(CFG, 2, generator=_gen(), split="test")
