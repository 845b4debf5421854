"""vqvae -> mmgpt -> generate end to end for a few steps: outputs exist, parse and reload."""

import json

import pytest
import torch

import fmm
from models import vqvae
from train import checkpoint
from train.__main__ import main
from train.data import WorldConfig
from train.loop import load_run
from train.recipes import generate

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tiny = ["--steps", "3", "--batch-size", "8", "--eval-per-class", "1"]
    main(["clip", "--out", str(root / "clip"), *tiny])
    main(["vqvae", "--out", str(root / "vqvae"), *tiny])
    main(["mmgpt", "--out", str(root / "mmgpt"), "--vqvae", str(root / "vqvae"),
          "--clip", str(root / "clip"), "--width", "32", "--layers", "1", *tiny])  # fmt: skip
    return root


def test_vqvae_reports_reconstruction_and_codebook_usage(runs):
    out = runs / "vqvae"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_recon_mse"] > 0 and metrics["steps"] == 3
    assert 1.0 <= metrics["heldout_perplexity"] <= metrics["codebook_size"]
    assert 0.0 < metrics["heldout_fraction_codes_used"] <= 1.0
    for name in ("reconstructions.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == PNG
    run = load_run(out, family="vqvae")
    assert run.cfg.grid == metrics["grid"]
    fresh = vqvae.init(run.cfg, fmm.random.fold_in(fmm.random.key(0), "init"))
    assert not torch.equal(fresh["codebook"]["weight"], run.params["codebook"]["weight"])
    # the EMA statistics the codebook came from are saved with it
    assert set(run.model_state) == {"cluster_size", "embed_sum"}


def test_mmgpt_trains_saves_and_scores_with_clip(runs):
    out = runs / "mmgpt"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean_last_50_steps"]["image_nll"] > 0 and metrics["scored_images"] == 48
    for name in ("consistency", "consistency_unseen_combos", "clip_on_vqvae_reconstructions"):
        assert 0.0 <= metrics[name] <= 1.0
    assert (out / "samples.png").read_bytes()[:8] == PNG
    kit = generate.drawing_kit(load_run(out, family="mmgpt"))
    assert kit["cfg"].image_len == kit["vqvae_cfg"].grid ** 2
    # the run carries its own copy of the tokeniser, identical to the VQ-VAE run's
    vq_params = load_run(runs / "vqvae", family="vqvae").params
    assert torch.equal(kit["vqvae_params"]["codebook"]["weight"], vq_params["codebook"]["weight"])


def test_generate_writes_a_grid_and_scores_the_prompt(runs, tmp_path, capsys):
    png = tmp_path / "grid.png"
    main(["generate", "--ckpt", str(runs / "mmgpt"), "--prompt", "a red circle above a blue square",
          "--n", "3", "--clip", str(runs / "clip"), "--out", str(png)])  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert png.read_bytes()[:8] == PNG
    assert summary["n"] == 3 and len(summary["clip_predictions"]) == 3
    assert 0.0 <= summary["consistency"] <= 1.0


def test_prompt_classes_pair_each_shape_with_its_colour():
    world = WorldConfig()
    n = len(world.shapes)
    red, blue = world.colors.index("red"), world.colors.index("blue")
    circle, square = world.shapes.index("circle"), world.shapes.index("square")
    assert generate.prompt_classes("a red circle above a blue square", world) == [
        red * n + circle,
        blue * n + square,
    ]
    assert generate.prompt_classes("a large red circle", world) == [red * n + circle]
    assert generate.prompt_classes("a circle", world) == []


def test_bad_flags_and_wrong_runs_are_refused(runs, tmp_path):
    with pytest.raises(SystemExit, match="--n must be >= 1"):
        main(["generate", "--ckpt", str(runs / "mmgpt"), "--n", "0"])
    with pytest.raises(SystemExit, match="names no colour-shape pair"):
        main(["generate", "--ckpt", str(runs / "mmgpt"), "--prompt", "a dog", "--n", "1",
              "--clip", str(runs / "clip"), "--out", str(tmp_path / "x.png")])  # fmt: skip
    with pytest.raises(
        checkpoint.CheckpointError, match="holds a 'clip' run, not a run of the 'vqvae' family"
    ):
        main(["mmgpt", "--vqvae", str(runs / "clip"), "--out", str(tmp_path / "m")])
    with pytest.raises(
        checkpoint.CheckpointError, match="holds a 'vqvae' run, not a run of the 'mmgpt' family"
    ):
        main(["generate", "--ckpt", str(runs / "vqvae")])
    with pytest.raises(SystemExit, match="--steps"):
        main(["vqvae", "--out", str(tmp_path / "v"), "--steps", "0"])
