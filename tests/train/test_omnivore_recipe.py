"""``python -m train omnivore`` end to end for a few steps: the outputs, a per-head curve,
every held-out and transfer figure, and the saved run scoring the same when reloaded."""

import json

import pytest
import torch

from models import omnivore
from models.family import check_batch
from train.__main__ import main
from train.data import WorldConfig
from train.data.video_shapes import VideoWorldConfig
from train.loop import load_run
from train.recipes.omnivore import Worlds, held_out_metrics, joint_batch

ARGS = ["--eval-per-class", "1", "--eval-per-pair", "1", "--eval-depth-scenes", "8"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("omnivore")
    main(["omnivore", "--out", str(out), "--steps", "2", "--batch-size", "4", *ARGS])
    return out


def test_recipe_writes_every_output(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"metrics.json", "loss.png", "params.safetensors", "config.json"} <= names
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2
    for name in ("shape_loss", "color_loss", "motion_loss", "nearest_loss"):
        assert metrics["mean_last_50_steps"][name] > 0
    figures = [k for k in metrics if "_acc" in k or k.startswith("transfer_")]
    assert len(figures) == 10
    assert all(0.0 <= metrics[k] <= 1.0 for k in figures)


def test_saved_run_reloads_and_scores_the_same(run_dir):
    run = load_run(run_dir, family="omnivore")
    assert isinstance(run.cfg, omnivore.OmnivoreConfig)
    assert [h[0] for h in run.cfg.heads] == ["shape", "color", "motion", "nearest"]
    assert run.cfg.stochastic_depth == omnivore.omnivore_shapes().stochastic_depth  # --drop-path
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    args = type("Args", (), {"seed": config["seed"], "eval_per_class": 1, "eval_per_pair": 1})
    args.eval_depth_scenes = 8
    again = held_out_metrics(
        run.params, run.cfg, Worlds(WorldConfig(), VideoWorldConfig()), args, "cpu"
    )
    assert {k: v for k, v in again.items() if k in metrics} == {
        k: metrics[k] for k in again if k in metrics
    }


def test_a_joint_batch_fits_the_family_fields():
    cfg = omnivore.omnivore_shapes()
    batch = joint_batch(Worlds(WorldConfig(), VideoWorldConfig()), torch.Generator(), 3)
    check_batch(omnivore.batch_fields(cfg), batch, where="joint_batch")
    assert batch["rgbd"].shape == (3, 4, 32, 32) and batch["videos"].shape == (3, 3, 8, 32, 32)
