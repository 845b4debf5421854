"""benchmarks/serve_load.py runs end to end (tiny counts) and loses or garbles no request.

Run in this process (its server still runs in a subprocess), so the test pays the imports
of one new process, not two.
"""

import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"


def test_serve_load_quick_loses_nothing_and_prints_every_figure(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--quick"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    text = capsys.readouterr().out
    assert "lost 0 | wrong 0 (of 2 x 40); one-by-one: lost 0 wrong 0 (of 8)" in text, text
    for figure in ("latency p50", "speedup", "during the bursts", "no HTTP", "listen queue", "lru hit",
                   "sqlite read (cold)", "all hits: True", "params size", "min cosine"):  # fmt: skip
        assert figure in text, (figure, text)
