"""The examples and benchmarks run end to end (tiny settings) and print what they promise.

Each script runs as a subprocess from the repo root, as a user would run it. One thread:
the figures do not matter here, and a busy machine slows multi-threaded runs most.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: float = 120) -> str:
    """stdout of ``python script args`` from the repo root; fails with stderr if rc != 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def number_after(label: str, text: str) -> float:
    """The first number printed after ``label`` (a literal string) in ``text``."""
    match = re.search(re.escape(label) + r"\s*([-+0-9.e]+)", text)
    assert match, f"no {label!r} in:\n{text}"
    return float(match.group(1))


def test_per_example_grads_example():
    out = run("examples/per_example_grads.py", "--batch-size", "4")
    assert "image.proj.weight [4, 64, 128]" in out
    assert number_after("max |vmap - loop| over all per-example grads:", out) < 1e-4
    losses = re.search(r"mean of per-example losses ([0-9.]+) == clip.loss ([0-9.]+)", out)
    assert losses and abs(float(losses[1]) - float(losses[2])) < 1e-5
    assert out.count("pulls hardest") == 3 and "DP-SGD clipping at" in out


def test_ensemble_example():
    args = ("--steps", "3", "--members", "2", "--batch-size", "8", "--log-every", "1")
    out = run("examples/ensemble.py", *args)
    rows = re.findall(r"member losses: ([0-9. ]+)", out)
    assert len(rows) == 3 and all(len(row.split()) == 2 for row in rows)
    assert "retrieval top-1 of the ensemble" in out


def test_per_example_grads_benchmark():
    out = run("benchmarks/per_example_grads.py", "--quick")
    assert "torch " in out and "threads 1" in out
    for row in ("loop of grad, sdpa (baseline)", "vmap(grad), math", "vmap(grad), sdpa"):
        assert row in out
    assert number_after("max |vmap(grad) math - loop sdpa| =", out) < 1e-3
    assert number_after("speedup vmap(grad) math vs loop sdpa:", out) > 0


def test_ensemble_benchmark():
    out = run("benchmarks/ensemble.py", "--quick")
    assert "threads 1" in out and "N = 2 members" in out
    assert "loop, autograd + sdpa (baseline)" in out and "vmap, func + math" in out
    # One AdamW step from the same grads; Adam can scale float32 rounding noise up towards lr.
    assert number_after("max |params after one step, vmap - loop| =", out) < 1e-3
    assert number_after("speedup N=2: vmap vs loop", out) > 0


def test_train_step_benchmark_quick_is_eager_only():
    out = run("benchmarks/train_step.py", "--quick")
    assert "threads 1" in out and "config micro" in out
    assert number_after("model FLOPs per step (FlopCounterMode, fwd + bwd):", out) > 0
    assert re.search(r"^eager\s+[0-9.]+\s+1\.00x", out, re.M)
    assert "peak mm" in out and "compiled" not in out


@pytest.mark.slow
def test_train_step_benchmark_compiled():
    out = run("benchmarks/train_step.py", "--quick", "--compile", timeout=600)
    assert re.search(r"^compiled\s+[0-9.]+\s+[0-9.]+x", out, re.M)
    assert "speedup compiled vs eager:" in out and "MFU compiled" in out
