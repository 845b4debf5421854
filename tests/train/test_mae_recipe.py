"""``python -m train mae`` for a few steps per modality (its probe figures and the figure),
the held-out splits the probes use, and the linear probe itself (:mod:`train.probe`): it
reads separable features and only guesses at random labels."""

import json

import pytest
import torch

from models import mae
from models.family import check_batch
from train import probe
from train.__main__ import main
from train.loop import load_run
from train.recipes._ssl import data_for, probe_set, probe_tasks, sound_pool, training_batch

ARGS = ["--steps", "2", "--batch-size", "4", "--probe-per-class", "2", "--probe-steps", "20"]
ARGS += ["--sound-pool", "8"]
FAST = probe.Budget(steps=100, lr=0.1)  # small problems converge in fewer steps
PROBE_KEYS = ("probe_accuracy", "probe_accuracy_random_init", "probe_gain_points")


@pytest.fixture(scope="module", params=["image", "audio"])
def run_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"mae_{request.param}")
    main(["mae", "--modality", request.param, "--out", str(out), *ARGS])
    return request.param, out


def test_recipe_writes_the_probe_figures_and_the_reconstructions(run_dir):
    modality, out = run_dir
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "loss.png", "reconstructions.png", "params.safetensors"} <= names
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(key in metrics for key in PROBE_KEYS)
    gain = 100 * (metrics["probe_accuracy"] - metrics["probe_accuracy_random_init"])
    assert metrics["probe_gain_points"] == pytest.approx(gain, abs=0.02)
    form, other = {"image": ("shape", "color"), "audio": ("timbre", "pitch")}[modality]
    assert metrics["probe_accuracy"] == metrics[f"probe_{form}_heldout"]
    for attr in (form, other):
        for split in ("heldout", "iid", "pretrain_heldout"):
            for suffix in ("", "_random_init"):
                assert 0.0 <= metrics[f"probe_{attr}_{split}{suffix}"] <= 1.0
            assert abs(metrics[f"probe_{attr}_{split}_gain_points"]) <= 100
    assert metrics["heldout_masked_mse"] > 0 and metrics["heldout_masked_mse_unseen_combos"] > 0
    run = load_run(out, family="mae")
    assert run.cfg.modality == modality


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_training_batches_fit_the_family_and_never_show_held_out_combos(modality):
    data = data_for(modality)
    cfg = mae.mae_tiny() if modality == "image" else mae.mae_audio_tiny()
    pool = None if modality == "image" else sound_pool(data, 5, seed=0)
    batch = training_batch(data, pool, torch.Generator().manual_seed(0), 3)
    check_batch(mae.batch_fields(cfg), batch, where="training_batch")
    x, attributes, unseen = probe_set(data, 2, seed=1)
    assert x.shape[1:] == cfg.input_shape and unseen.any() and not unseen.all()
    assert all(len(labels) == len(x) for labels, _ in attributes.values())


def test_probe_tasks_fit_on_seen_rows_of_the_first_set_and_test_on_the_second():
    unseen = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)
    fitted = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    tasks = probe_tasks({"shape": (torch.zeros(6, dtype=torch.int64), 2)}, unseen, fitted)
    held, iid, pretrain = (tasks[f"shape_{s}"] for s in ("heldout", "iid", "pretrain_heldout"))
    assert held.train.tolist() == iid.train.tolist() == [1, 0, 1, 0, 0, 0]
    assert held.test.tolist() == pretrain.test.tolist() == [0, 0, 0, 0, 1, 0]
    assert iid.test.tolist() == [0, 0, 0, 1, 0, 1]
    assert pretrain.train.tolist() == [1, 1, 1, 0, 0, 0]


def _blobs(n: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=g)
    centres = 4 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def test_the_probe_reads_separable_features():
    x, y = _blobs(400, 5, 16, seed=0)
    test_x, test_y = _blobs(200, 5, 16, seed=1)
    fitted = probe.fit(x, y, classes=5, budget=FAST)
    assert probe.accuracy(fitted, test_x, test_y) > 0.97


def test_the_probe_only_guesses_at_random_labels():
    x, _ = _blobs(600, 5, 16, seed=0)
    y = torch.randint(4, (600,), generator=torch.Generator().manual_seed(3))
    train = torch.arange(600) < 300
    task = probe.Task(y, train, ~train, 4)
    assert abs(probe.score(x, task, budget=FAST) - 0.25) < 0.1


def test_compare_reports_the_gain_of_the_headline_tasks():
    x, y = _blobs(300, 3, 8, seed=0)
    train = torch.arange(300) < 200
    tasks = {"blobs": probe.Task(y, train, ~train, 3)}
    noise = torch.randn(300, 8, generator=torch.Generator().manual_seed(5))
    report = probe.compare(tasks, trained=x, random_init=noise, headline=("blobs",), budget=FAST)
    assert report["probe_accuracy"] == report["probe_blobs"] > 0.95
    assert report["probe_accuracy_random_init"] == report["probe_blobs_random_init"] < 0.6
    assert report["probe_gain_points"] == report["probe_blobs_gain_points"] > 35
    with pytest.raises(ValueError, match="headline"):
        probe.compare(tasks, trained=x, random_init=noise, headline=("nope",))
    with pytest.raises(ValueError, match="labels must lie"):
        probe.fit(x, y + 3, classes=3)
