"""Files and folders we write get the user's umask, as ``open()`` and ``mkdir`` would give
them: a run one account writes is readable by another when the umask allows it."""

import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WRITE_EVERY_KIND = """
import sys
from pathlib import Path

import torch

from fmm.io import atomic_write
from train import checkpoint

out = Path(sys.argv[1])
params = {"w": torch.zeros(3)}
checkpoint.save(out / "run", params, config={}, files={"metrics.json": {}, "tok.json": "{}"})
checkpoint.save(out / "run", params, config={"again": True})
checkpoint.save_params(out / "lone" / "params.safetensors", params)
atomic_write(out / "plots" / "loss.png", lambda tmp: Path(tmp).write_bytes(b"png"))
checkpoint.save_sharded(out / "run" / "checkpoints", 1, {"w": torch.zeros(3)})
"""


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=lambda m: f"umask{m:03o}")
def test_files_and_folders_get_the_umask(tmp_path, umask):
    out = tmp_path / "out"
    subprocess.run(
        ["sh", "-c", f'umask {umask:03o} && exec "$0" -c "$1" "$2"', sys.executable,
         WRITE_EVERY_KIND, str(out)],
        cwd=ROOT, check=True, timeout=120,
    )  # fmt: skip
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    files = {name for name in modes if (out / name).is_file()}
    assert {"run/params.safetensors", "run/manifest.json", "plots/loss.png"} <= files
    assert any(name.startswith("run/checkpoints/step_00000001/") for name in files)
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o666 if name in files else 0o777) & ~umask
    }
    assert wrong == {}, f"under umask {umask:03o}"
