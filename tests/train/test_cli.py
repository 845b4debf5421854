"""The main job end to end, for a few steps: outputs exist, parse, and reload bit for bit."""

import json
import subprocess
import sys

import pytest
import torch

import fmm
from models import clip
from train.__main__ import main
from train.data import WorldConfig
from train.evaluate import zero_shot_accuracy
from train.recipes.clip import load_run, normalize_images


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    main(["clip", "--out", str(out), "--steps", "4", "--batch-size", "8", "--eval-per-class", "1"])
    return out


def test_main_job_writes_every_output(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "metrics.json",
        "loss.png",
        "zero_shot.png",
        "params.safetensors",
        "config.json",
        "tokenizer.json",
    } <= names
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["train_seconds"] > 0
    assert 0.0 <= metrics["zero_shot_top1"] <= 1.0 and metrics["final_loss"] > 0
    for plot in ("loss.png", "zero_shot.png"):
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_run_reloads_and_scores_the_same(run_dir):
    cfg, params, tokenizer = load_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    encode = lambda images: clip.encode_image(params, normalize_images(images), cfg=cfg)
    embed = lambda texts: clip.encode_text(
        params, tokenizer.encode(texts, cfg.context_length), cfg=cfg
    )
    with torch.no_grad():
        acc = zero_shot_accuracy(WorldConfig(), encode, embed, n_per_class=1, seed=1)
    assert acc["top1"] == metrics["zero_shot_top1"]
    # and the params are the trained ones, not a fresh init
    fresh = clip.init(cfg, fmm.random.fold_in(fmm.random.key(0), "init"))
    assert not torch.equal(fresh["text"]["proj"]["weight"], params["text"]["proj"]["weight"])


def test_help_explains_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "train", "clip", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--out", "--steps", "--batch-size", "--lr", "--seed", "--compile", "--no-compile"):
        assert flag in out


def test_bad_flags_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--steps"):
        main(["clip", "--out", str(tmp_path), "--steps", "0"])
