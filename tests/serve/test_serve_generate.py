"""benchmarks/serve_generate.py runs end to end (a 2-layer toy, 1 and 4 clients) and prints
every row and every goal. Run in this process, as tests/serve/test_serve_load.py does."""

import runpy
import sys
from pathlib import Path

from fmm.invariance import packed_available

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_generate.py"


def test_serve_generate_quick_prints_every_row_and_goal(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--quick"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    text = capsys.readouterr().out
    for method in ("per-request", "per-request, HTTP", "scheduler", "scheduler, HTTP",
                   "transformers CB"):  # fmt: skip
        for clients in (1, 4):
            assert f"{method:<32}{clients:>8}" in text, (method, clients, text)
    for goal in ("scheduler / per-request tokens/s", "scheduler / transformers CB tokens/s",
                 "gap p99 / single-stream step, 4 clients", "1 client / fmm.decoding.generate",
                 "single stream, fmm.decoding.generate:"):  # fmt: skip
        assert goal in text, (goal, text)
    if packed_available():  # generate is timed under the scheduler's linear layers too
        assert "single stream, fmm.decoding.generate, packed linears:" in text, text
