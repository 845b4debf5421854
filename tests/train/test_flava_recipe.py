"""``python -m train flava`` end to end for a few steps: every output exists, the per-task
curves are recorded, and the saved run reloads to the same held-out retrieval score."""

import json
import math

import pytest
import torch

import fmm
from models import flava
from train.__main__ import main
from train.data import WorldConfig, sample_scenes
from train.loop import load_run
from train.recipes.flava import retrieval_r1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("flava")
    main(
        ["flava", "--out", str(out), "--steps", "3", "--batch-size", "8",
         "--eval-per-class", "1", "--eval-scenes", "16"]
    )  # fmt: skip
    return out


def test_recipe_writes_every_output_with_per_task_losses(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"metrics.json", "loss.png", "params.safetensors", "config.json", "tokenizer.json"} <= names  # fmt: skip
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["train_seconds"] > 0
    assert set(flava.TASKS) <= set(metrics["mean_last_50_steps"])
    assert set(metrics["held_out_task_losses"]) == set(flava.TASKS)
    for group in (metrics["held_out_task_losses"], metrics["mean_last_50_steps"]):
        assert all(math.isfinite(group[t]) and group[t] > 0 for t in flava.TASKS)
    for name in ("image_to_text_r1", "zero_shot_top1", "held_out_itm_acc", "held_out_mlm_acc"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["mim_targets"].startswith("random codebook")


def test_saved_run_reloads_and_scores_the_same(run_dir):
    run = load_run(run_dir, family="flava")
    cfg, params, tokenizer = run.cfg, run.params, run.tokenizer
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    g = torch.Generator().manual_seed(config["seed"] + 2)
    scenes = sample_scenes(WorldConfig(), metrics["retrieval_scenes"], generator=g, split="eval")
    with torch.no_grad():
        assert retrieval_r1(params, cfg, scenes, tokenizer, "cpu") == metrics["image_to_text_r1"]
    # the text [MASK] id sits past the tokenizer's words, inside the model's vocabulary
    assert cfg.pretrain.mask_id == tokenizer.vocab_size == cfg.vocab_size - 1
    assert config["flava"]["pretrain"]["mask_id"] == cfg.pretrain.mask_id
    fresh = flava.init(cfg, fmm.random.fold_in(fmm.random.key(0), "init"))
    assert not torch.equal(fresh["heads"]["itm"]["out"]["weight"], params["heads"]["itm"]["out"]["weight"])  # fmt: skip


def test_bad_arguments_stop_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="--batch-size must be >= 2"):
        main(["flava", "--out", str(tmp_path), "--steps", "1", "--batch-size", "1"])
