"""benchmarks/serve_abuse.py runs end to end (small bodies) and every hostile request it
sends is a 4xx: never a 500, a 200 or no answer.

Run in this process (its server still runs in a subprocess), as test_serve_load.py does.
"""

import re
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_abuse.py"


def test_serve_abuse_quick_answers_every_attack_with_a_4xx(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--quick"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    text = capsys.readouterr().out
    answers = re.findall(r"-> (\d+) (?:in|after) ", text)
    assert len(answers) == 9 + 10, text  # nine single requests, ten slow senders
    assert all(400 <= int(status) < 500 for status in answers), text
    assert "failures none" in text and "answers by status: {422: 4}" in text, text
    assert re.search(r"ratio \d+\.\d\d \(goal <= 1\.5\)", text), text
