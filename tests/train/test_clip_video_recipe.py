"""clip --modality video, and videogpt --judge with that run, end to end at tiny sizes: the
video CLIP's zero-shot over every caption of the world, the judge's consistency in
videogpt's metrics.json and samples, and the flags they refuse."""

import json

import pytest
import torch
from PIL import Image

from models import videogpt as vg
from train.__main__ import main
from train.data.video_shapes import VideoWorldConfig, clip_eval_set, sample_clips
from train.loop import load_run
from train.recipes import videogpt
from train.recipes.clip_video import world_captions

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--steps", "2", "--batch-size", "4", "--eval-per-pair", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    main(["video-vqvae", "--preset", "video_vqvae_tiny", "--out", str(root / "vq"), *TINY])
    # The judge at the tiny VQ-VAE's clip size: 4 frames of 16 px.
    main(["clip", "--modality", "video", "--frames", "4", "--video-size", "16",
          "--out", str(root / "clip"), *TINY])  # fmt: skip
    main(["videogpt", "--vqvae", str(root / "vq"), "--judge", str(root / "clip"),
          "--width", "24", "--layers", "1", "--out", str(root / "gpt"), *TINY])  # fmt: skip
    return root


def test_the_video_clip_run_reports_zero_shot_over_every_caption(runs):
    out = runs / "clip"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["zero_shot_captions"] == len(world_captions(VideoWorldConfig())[0])
    assert metrics["eval_clips"] == 7 * 6  # every motion x shape pair once
    for name in ("zero_shot_top1_seen_combos", "zero_shot_top1_unseen_combos",
                 "zero_shot_motion_top1_unseen_combos"):  # fmt: skip
        assert 0.0 <= metrics[name] <= 1.0, name
    assert (out / "zero_shot.png").read_bytes()[:8] == PNG
    run = load_run(out, family="clip")
    assert (run.cfg.frames, run.cfg.image_size) == (4, 16)
    assert run.config["modality"] == "video"


def test_videogpt_writes_the_judges_consistency(runs):
    out = runs / "gpt"
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("consistency", "consistency_unseen_combos", "consistency_motion",
                 "judge_on_clips", "judge_motion_on_clips", "judge_on_vqvae_reconstructions",
                 "judge_motion_on_vqvae_reconstructions"):  # fmt: skip
        assert 0.0 <= metrics[name] <= 1.0, name
    assert metrics["judged_clips"] == metrics["drawn_clips"] == 42
    assert "ranks its caption first" in Image.open(out / "samples.gif").info["comment"].decode()
    assert (out / "samples.png").read_bytes()[:8] == PNG


def test_the_judge_scores_each_clip_against_its_own_caption(runs, monkeypatch):
    """An oracle judge (it always picks the clip's own caption) scores 1 on seen and unseen
    pairs, a judge that always picks one caption scores its share: the plumbing's indices."""
    world = VideoWorldConfig(image_size=16, frames=4)
    clips = clip_eval_set(world, 1, seed=3)
    captions, _ = world_captions(world)
    own = torch.tensor([captions.index(c) for c in clips.captions])
    monkeypatch.setattr(videogpt, "clip_judge", lambda *a, **k: lambda x: own[: len(x)])
    got = videogpt.judged(runs / "clip", world, clips, clips.videos, clips.videos, "cpu")
    assert got["consistency"] == got["consistency_unseen_combos"] == 1.0
    assert got["consistency_motion"] == got["judge_on_clips"] == 1.0
    assert got["judge_motion_on_vqvae_reconstructions"] == 1.0
    monkeypatch.setattr(videogpt, "clip_judge", lambda *a, **k: lambda x: own[:1].expand(len(x)))
    got = videogpt.judged(runs / "clip", world, clips, clips.videos, clips.videos, "cpu")
    assert got["consistency"] == round(1 / 38, 4)  # clip 0's pair is one of the 38 seen
    assert got["consistency_unseen_combos"] == 0.0


def test_world_captions_are_every_caption_a_clip_can_have():
    world = VideoWorldConfig()
    captions, attrs = world_captions(world)
    assert len(set(captions)) == len(captions) == 8 * 6 * (6 + 7) * 2
    sampled = sample_clips(world, 256, generator=torch.Generator().manual_seed(0), split="eval")
    assert set(sampled.captions) <= set(captions)
    index = [captions.index(c) for c in sampled.captions]
    assert torch.equal(attrs["motion"][index], sampled.motions)
    assert torch.equal(attrs["stop"][index], sampled.stops)


def test_a_judge_of_another_clip_size_and_image_flags_are_refused(runs, tmp_path):
    # The tiny judge takes 4 frames of 16 px; the default VQ-VAE's clips are 8 of 32.
    with pytest.raises(SystemExit, match=r"--judge .* 4 frames at 16 px.* 8 at 32 px"):
        videogpt._check_judge(runs / "clip", vg.video_vqvae_shapes())
    with pytest.raises(SystemExit, match="--export is for image runs"):
        main(["clip", "--modality", "video", "--export", "hf", "--out", str(tmp_path / "x")])
