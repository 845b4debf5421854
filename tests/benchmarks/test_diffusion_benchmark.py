"""benchmarks/diffusion.py runs end to end (``--quick``: a micro U-Net, 3 DDIM steps, eager)
and its checks hold: fmm's images equal TorchMultimodal's and both losses agree on the
same draws. Its figures mean nothing here."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_agrees_with_torchmultimodal_and_prints_both_races():
    # One thread: a busy machine slows multi-threaded runs most. The repo root on the path,
    # as the script's own folder comes first on sys.path when it runs.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "benchmarks/diffusion.py", "--quick"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "threads 1" in out and "DDIM sampling: 3 U-Net calls" in out
    diff = re.search(r"^  fmm eager\s+(\S+)\s+vs torchmultimodal eager: (\S+)", out, re.M)
    assert diff and float(diff[1]) < 1e-5 and float(diff[2]) < 1e-5, out
    losses = re.search(r"same t and noise: fmm loss (\S+), torchmultimodal (\S+)", out)
    assert losses and abs(float(losses[1]) - float(losses[2])) < 1e-5, out
    assert out.count("fmm eager speedup vs fastest reference (torchmultimodal eager)") == 2
    assert "compiled" not in out
