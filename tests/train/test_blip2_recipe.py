"""``python -m train blip2`` end to end at a tiny size: the three phases over a tiny CLIP
run, the frozen parts left bit for bit, the held-out figures and the plot, ``--lm`` reuse,
and bad flags refused by name before any directory exists."""

import json

import pytest
import torch

import fmm
from train.__main__ import cli, main
from train.loop import load_run

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--batch-size", "4", "--eval-scenes", "4", "--lm-steps", "2", "--stage1-steps", "2"]
TINY += ["--stage2-steps", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2")
    clip_run = root / "clip"
    main(["clip", "--steps", "1", "--batch-size", "4", "--eval-per-class", "1",
          "--out", str(clip_run)])  # fmt: skip
    main(["blip2", "--clip", str(clip_run), "--out", str(root / "run"), *TINY])
    return root


def test_the_run_reports_captions_and_answers_for_seen_and_unseen_scenes(runs):
    metrics = json.loads((runs / "run" / "metrics.json").read_text())
    for name in ("caption_colour_shape_exact", "caption_colour", "caption_shape", "vqa_colour",
                 "vqa_shape"):  # fmt: skip
        for split in ("", "_seen", "_unseen"):
            value = metrics[f"{name}{split}"]
            assert value != value or 0.0 <= value <= 1.0, (name, split)  # NaN: no such scene
    assert metrics["eval_scenes"] == 4 and len(metrics["samples"]) == 4
    assert metrics["lm_steps"] == 2 and metrics["stage1_steps"] == 2 and metrics["steps"] == 2
    assert (runs / "run" / "captions.png").read_bytes()[:8] == PNG


def test_frozen_parts_keep_every_bit(runs):
    final = load_run(runs / "run", family="blip2")
    assert final.cfg.stage == 2 and final.cfg.image_norm_pre
    clip_image = load_run(runs / "clip", family="clip").params["image"]
    stage1 = load_run(runs / "run" / "stage1", family="blip2").params
    lm = load_run(runs / "run" / "lm", family="gpt").params
    flat = fmm.tree.flatten(final.params)
    for name, value in fmm.tree.flatten(
        {k: v for k, v in clip_image.items() if k != "proj"}
    ).items():
        assert torch.equal(flat[f"image.{name}"], value), name
    for name, value in fmm.tree.flatten(lm).items():
        assert torch.equal(flat[f"lm.{name}"], value), name
    # Stage one's heads and the Q-Former's text parts: stage two reads and decays none.
    before = fmm.tree.flatten(stage1)
    for name in ("itm_head.weight", "clm_head.out.weight", "qformer.token.weight",
                 "qformer.transformer.blocks.0.mlp.fc1.weight"):  # fmt: skip
        assert torch.equal(flat[name], before[name]), name
    assert not torch.equal(flat["query_tokens"], before["query_tokens"])


@pytest.mark.slow  # a second run of two phases
def test_a_trained_lm_is_reused(runs):
    out = runs / "again"
    main(["blip2", "--clip", str(runs / "clip"), "--lm", str(runs / "run" / "lm"),
          "--out", str(out), *TINY])  # fmt: skip
    assert not (out / "lm").exists() and (out / "stage1").is_dir()
    assert "lm_steps" not in json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--stage1-steps", "0"], "--stage1-steps"),
        (["--qa-share", "1.5"], "--qa-share"),
        (["--steps", "7"], "--steps"),
        (["--clip", "MISSING"], "MISSING"),
        (["--lm", "CLIP"], "--lm"),
    ],
)
def test_bad_flags_are_refused_by_name_before_any_directory(runs, tmp_path, capsys, flags, named):
    out = tmp_path / "never"
    argv = ["blip2", "--clip", str(runs / "clip"), "--out", str(out), *flags]
    argv = [str(runs / "clip") if a == "CLIP" else str(tmp_path / a) if a == "MISSING" else a
            for a in argv]  # fmt: skip
    try:
        status = cli(argv)
    except SystemExit as e:  # argparse's refusals exit while parsing
        status = e.code
    assert status == 2
    assert named in capsys.readouterr().err
    assert not out.exists()
