"""benchmarks/serve_load.py runs end to end (tiny counts) and loses or garbles no request."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_load_quick_loses_nothing_and_prints_every_figure():
    out = subprocess.run(
        [sys.executable, "benchmarks/serve_load.py", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "lost 0 | wrong 0 (of 40); one-by-one: lost 0 wrong 0 (of 8)" in text, text
    for figure in ("latency p50", "speedup", "during the burst", "no HTTP", "lru hit", "sqlite read (cold)", "all hits: True",
                   "params size", "min cosine"):  # fmt: skip
        assert figure in text, (figure, text)
