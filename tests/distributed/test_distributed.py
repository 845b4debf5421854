"""Real processes, gloo, 2 ranks on CPU: DDP and FSDP2 equal one process; exact resume;
save at 2 ranks, load at 1; the documented torchrun command.

Launching torchrun costs seconds, so one launch checks many things: the worker
(tests/scripts/dist_worker.py) writes what it measured to JSON and these tests assert on it.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fmm
from train import checkpoint
from train import distributed as D
from train.__main__ import main
from train.loop import load_run

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests/scripts/dist_worker.py"
TOL = 1e-5


def _torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _torchrun(WORKER, "first", out)
    _torchrun(WORKER, "resume", out)  # a new process group: the first one has exited
    first = json.loads((out / "first.json").read_text())
    resumed = json.loads((out / "resume.json").read_text())
    return out, first, resumed


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_loss_grads_and_params_equal_a_single_process_run(runs, mode):
    r = runs[1][mode]
    assert runs[1]["world_size"] == 2
    assert r["loss_diff"] < TOL and r["grad_diff"] < TOL
    assert r["step_loss_diff"] < TOL and r["param_diff"] < TOL  # 3 clipped AdamW steps
    assert r["min_grad_norm"] > 1.0  # so the cross-rank clipping norm was exercised


def test_fsdp_rank_holds_about_half_the_parameter_bytes(runs):
    assert 0.45 < runs[1]["fsdp"]["param_bytes_fraction"] < 0.55


def test_activation_checkpointing_under_fsdp_gives_the_same_grads(runs):
    plain, ac = runs[1]["fsdp"], runs[1]["fsdp_ac"]
    assert ac["grad_diff"] < TOL and ac["param_diff"] < TOL
    assert ac["grad_diff"] == plain["grad_diff"]


def test_gather_handles_unequal_per_rank_batches(runs):
    r = runs[1]["unequal"]
    assert r["loss_diff"] < 1e-12 and r["grad_diff"] < 1e-12


def test_resume_after_exit_continues_bit_for_bit(runs):
    out, first, resumed = runs
    assert resumed["resumed_from"] == 10
    assert first["first_losses"] == first["straight_losses"][:10]
    assert resumed["resumed_losses"] == first["straight_losses"][10:]
    straight = fmm.tree.flatten(checkpoint.load_params(out / "straight.safetensors"))
    again = fmm.tree.flatten(checkpoint.load_params(out / "resumed.safetensors"))
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def _worker():
    spec = importlib.util.spec_from_file_location("dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoint_saved_at_2_ranks_loads_at_1(runs):
    out, first, _ = runs
    w = _worker()
    _, adapter, step, state = w.build(None)
    g = torch.Generator()
    ckpt = w.checkpoint_state(adapter, state, g)
    at, _ = checkpoint.load_sharded(out / "ckpt", ckpt)
    assert at == 10
    half = fmm.tree.flatten(checkpoint.load_params(out / "half.safetensors"))
    loaded = fmm.tree.flatten(adapter.tree())
    assert all(torch.equal(loaded[k], half[k]) for k in half)
    g.set_state(ckpt["data"]["generator"])
    state = {"opt_state": state["opt_state"], "step": ckpt["step"], "key": ckpt["key"]}
    _, losses = w.train(D.Env(0, 1, torch.device("cpu")), 1, state, step, g)
    assert abs(losses[0] - first["next_loss"]) < 1e-9  # step 11 at 1 rank == at 2 ranks


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_fsdp_cli_then_resume_on_one_process(tmp_path):
    out = tmp_path / "clip_fsdp"
    args = ["--batch-size", "8", "--eval-per-class", "1", "--out", str(out)]
    _torchrun("-m", "train", "clip", "--dist", "fsdp", "--ac", "--precision", "bf16-mixed",
              "--checkpoint-every", "1", "--steps", "2", *args)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dist"] == "fsdp" and metrics["world_size"] == 2 and metrics["steps"] == 2
    assert checkpoint.latest_step(out / "checkpoints") == 2
    losses = _losses(out)
    # Resume the 2-rank run in this one process (the pure step) and take it to step 3.
    main(["clip", "--resume", "--steps", "3", *args])
    resumed = _losses(out)
    assert resumed[:2] == losses and len(resumed) == 3
    assert checkpoint.latest_step(out / "checkpoints") is not None


def test_torchrun_albef_with_its_train_state_then_resume_on_one_process(tmp_path):
    # The stateful family end to end: momentum encoders sharded like the params, queues whole,
    # both in the checkpoint; the one-process resume continues the same history.
    out = tmp_path / "albef_fsdp"
    args = ["--batch-size", "8", "--eval-per-class", "1", "--rerank-k", "1", "--out", str(out)]
    _torchrun("-m", "train", "albef", "--dist", "fsdp", "--ac", "--checkpoint-every", "2",
              "--steps", "2", *args)  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    losses = _losses(out)
    main(["albef", "--resume", "--steps", "3", *args])
    assert _losses(out)[:2] == losses and len(_losses(out)) == 3
    state = load_run(out, family="albef").model_state
    assert int(state["step"]) == 3 and int(state["queue"]["ptr"]) == 3 * 8  # queue of 256


@pytest.mark.slow  # ~10 s each on 2 cores: the engine is covered for every family by test_families
@pytest.mark.parametrize("recipe", ["flava", "mmgpt"])
def test_torchrun_fsdp_ac_runs_the_recipe(tmp_path, recipe):
    extra = []
    if recipe == "mmgpt":
        main(["vqvae", "--out", str(tmp_path / "vq"), "--steps", "1", "--batch-size", "4",
              "--eval-per-class", "1"])  # fmt: skip
        extra = ["--vqvae", str(tmp_path / "vq"), "--width", "32", "--layers", "2"]
    out = tmp_path / recipe
    _torchrun("-m", "train", recipe, "--dist", "fsdp", "--ac", "--steps", "5", "--batch-size",
              "8", "--eval-per-class", "1", "--out", str(out), *extra)  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    assert len(_losses(out)) == 5


def test_cached_decoding_entry_points_under_fsdp(runs):
    r = runs[1]["decoding"]
    assert r["prefill_diff"] == 0.0 and r["decode_diff"] == 0.0
    assert r["sharded_after"]  # the params went back to their shards after the call


def test_scale_flags_fail_clearly(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    out = ["--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="needs a torchrun launch"):
        main(["clip", "--dist", "fsdp", *out])
    with pytest.raises(SystemExit, match="--compile is for the single-process"):
        main(["clip", "--ac", "--compile", *out])
    with pytest.raises(SystemExit, match="--resume: no completed checkpoint"):
        main(["clip", "--resume", "--steps", "1", "--batch-size", "2", *out])
