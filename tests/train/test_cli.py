"""The main job end to end, for a few steps: outputs exist, parse, and reload bit for bit."""

import json
import subprocess
import sys

import pytest
import torch

import fmm
from models import clip
from train.__main__ import cli, main
from train.checkpoint import CheckpointError
from train.data import WorldConfig
from train.evaluate import zero_shot_accuracy
from train.loop import load_run
from train.recipes import plan as plan_recipe
from train.recipes.clip import normalize_images


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
    run = load_run(run_dir, family="clip")
    cfg, params, tokenizer = run.cfg, run.params, run.tokenizer
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


SHARED_FLAGS = ("--out", "--overwrite", "--steps", "--batch-size", "--lr", "--weight-decay",
                "--warmup", "--seed", "--device", "--compile", "--dist", "--ac", "--precision",
                "--checkpoint-every", "--resume", "--config", "--log")  # fmt: skip


def test_every_training_recipe_declares_the_shared_flags_once():
    import argparse

    from train.__main__ import TASKS
    from train.loop import Recipe

    recipes = {name: task for name, (task, _) in TASKS.items() if isinstance(task, Recipe)}
    assert set(recipes) == {
        "clip", "flava", "albef", "vqvae", "mmgpt", "omnivore", "video-vqvae", "videogpt",
        "mae", "data2vec", "clap", "mdetr", "diffusion", "blip2", "coca",
    }  # fmt: skip
    for name, recipe in recipes.items():
        parser = argparse.ArgumentParser()
        recipe.add_arguments(parser)  # argparse refuses a flag declared twice
        flags = {f for a in parser._actions for f in a.option_strings}
        assert set(SHARED_FLAGS) <= flags, (name, set(SHARED_FLAGS) - flags)


CUDA_MISSING = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _user_errors(tmp_path):
    """``(argv, what the one line must name)`` for mistakes users make."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "img.png").write_bytes(b"png")
    (tmp_path / "vocab.txt.gz").write_bytes(b"")
    missing = str(tmp_path / "no_such_run")
    zeroshot = ["zeroshot", str(tmp_path / "img.png"), "--vocab", str(tmp_path / "vocab.txt.gz"),
                "--labels", "a,b"]  # fmt: skip
    return [
        (["serve", "--ckpt", missing], f"no config.json in {missing}"),
        (["serve", "--ckpt", missing, "--device", "tpu"], "--device 'tpu'"),
        ([*zeroshot, "--weights", str(tmp_path / "img.png"), "--format", "clip.cpp"], "--format"),
        (
            [*zeroshot, "--weights", str(tmp_path / "w.pt"), "--format", "hf"],
            "w.pt' does not exist",
        ),
        (["plan", "--model", "nonexistent"], "unknown model 'nonexistent'"),
        (["clip", "--device", "cuda:99"], "--device 'cuda:99' is not available"),
        (["clip", "--out", str(tmp_path / "a_file")], "a_file' is a file, not a run directory"),
        (["vqvae", "--out", str(tmp_path / "a_file" / "run")], "a_file is a file"),
        (["clip", "--lr", "nan"], "--lr must be a finite number, got 'nan'"),
        (["flava", "--lr", "0"], "--lr must be > 0, got '0'"),
        (["clip", "--steps", "0"], "--steps must be >= 1, got '0'"),
        (["albef", "--batch-size", "1"], "--batch-size must be >= 2, got '1'"),
        (["mmgpt", "--vqvae", missing, "--caption-dropout", "1"], "--caption-dropout must be"),
        (["generate", "--ckpt", missing, "--top-k", "two"], "--top-k must be an integer"),
    ]


def _exit_status(argv):
    """What ``sys.exit(cli(argv))`` (``python -m train``) exits with."""
    try:
        return cli(argv)
    except SystemExit as exit_:  # argparse's refusals leave from inside the parser
        return exit_.code


def _answered_in_one_line(capsys, argv, named):
    code = _exit_status(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"python -m train {argv[0]}: error: ") and named in err, err


def test_user_errors_are_one_line_and_status_2(tmp_path, capsys):
    for argv, named in _user_errors(tmp_path):
        _answered_in_one_line(capsys, argv, named)
    assert not (tmp_path / "a_file").is_dir()  # refused before any run directory was made


@CUDA_MISSING
def test_cuda_on_a_cpu_build_is_one_line(tmp_path, capsys, monkeypatch):
    for argv in (
        ["clip", "--device", "cuda"],
        ["serve", "--ckpt", str(tmp_path), "--device", "cuda"],
    ):
        _answered_in_one_line(capsys, argv, "--device 'cuda' is not available")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    _answered_in_one_line(capsys, ["clip", "--device", "cuda"], "was built without CUDA")


def test_python_m_train_answers_user_errors_in_one_line(tmp_path):
    for argv, named in [
        (["clip", "--lr", "nan", "--out", str(tmp_path / "run")], "--lr"),
        (["serve", "--ckpt", str(tmp_path / "nothing")], "no config.json"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "train", *argv], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and named in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["serve", "--ckpt", str(tmp_path / "nothing")]
    assert cli(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "CheckpointError" in err and "no config.json" in err
    monkeypatch.setenv("FMM_DEBUG", "1")
    assert cli(argv) == 2 and "Traceback" in capsys.readouterr().err


def test_a_bug_is_not_taken_for_a_user_error(monkeypatch):
    def buggy(args):
        return {}["missing key"]

    monkeypatch.setattr(plan_recipe, "run", buggy)
    with pytest.raises(KeyError):  # so python -m train prints its traceback and exits 1
        cli(["plan", "--model", "gpt_tiny"])


def test_main_raises_what_cli_answers(tmp_path):
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        main(["clip", "--out", str(tmp_path), "--steps", "0"])
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        main(["serve", "--ckpt", str(tmp_path / "nothing")])
