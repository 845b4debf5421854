"""Sharded checkpoints in one process: round trip, atomicity under SIGKILL, clear errors, and
no code run from a crafted file."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import checkpoint
from train.__main__ import main
from train.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[2]


def _state(offset=0.0):
    return {
        "params": {"w": torch.arange(6.0).reshape(2, 3) + offset, "blocks": [torch.ones(2)]},
        "opt_state": ({}, {"count": torch.tensor(3), "mu": {"w": torch.full((2, 3), 0.5)}}),
        "key": torch.tensor([7, 8]),
        "data": {"generator": torch.Generator().manual_seed(5).get_state()},
    }


def _zeros_like(state):
    return {
        "params": {"w": torch.zeros(2, 3), "blocks": [torch.zeros(2)]},
        "opt_state": ({}, {"count": torch.tensor(0), "mu": {"w": torch.zeros(2, 3)}}),
        "key": torch.zeros(2, dtype=torch.int64),
        "data": {"generator": torch.Generator().get_state()},
    }


def test_round_trip_fills_the_template_in_place_and_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save_sharded(tmp_path, step, _state(step), extra={"losses": [0.5] * step})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_00000002",
        "step_00000003",
    ]
    template = _zeros_like(_state())
    w, count = template["params"]["w"], template["opt_state"][1]["count"]
    step, extra = checkpoint.load_sharded(tmp_path, template)
    assert template["opt_state"][1]["count"] is count and int(count) == 3  # 0-d, in place too
    assert step == 3 and extra == {"step": 3, "losses": [0.5] * 3}
    assert template["params"]["w"] is w and torch.equal(w, _state(3)["params"]["w"])
    assert torch.equal(template["opt_state"][1]["count"], torch.tensor(3))
    assert torch.equal(template["data"]["generator"], _state()["data"]["generator"])
    step, _ = checkpoint.load_sharded(tmp_path, template, step=2)
    assert step == 2 and torch.equal(w, _state(2)["params"]["w"])


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/scripts/kill_during_save.py"), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stdout + proc.stderr  # died mid-save, by SIGKILL
    assert (tmp_path / ".tmp-step_00000002").is_dir()  # the half-written save
    assert checkpoint.latest_step(tmp_path) == 1
    template = {"w": torch.zeros(2, 3), "step": torch.tensor(0)}
    assert checkpoint.load_sharded(tmp_path, template)[0] == 1
    assert torch.equal(template["w"], torch.arange(6.0).reshape(2, 3))
    # The next save clears the remnant and completes.
    checkpoint.save_sharded(tmp_path, 2, {"w": template["w"] + 1, "step": torch.tensor(2)})
    assert checkpoint.latest_step(tmp_path) == 2 and not (tmp_path / ".tmp-step_00000002").exists()


def test_missing_and_mismatched_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no completed checkpoint"):
        checkpoint.load_sharded(tmp_path, _state())
    checkpoint.save_sharded(tmp_path, 1, _state())
    wrong = _zeros_like(_state())
    wrong["params"]["extra"] = torch.zeros(1)
    wrong["params"]["w"] = torch.zeros(3, 2)
    del wrong["key"]
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_sharded(tmp_path, wrong)
    assert "missing: params.extra" in str(info.value)
    assert "unexpected: key" in str(info.value)
    assert "mismatched params.w: expected [3, 2], got [2, 3]" in str(info.value)
    with pytest.raises(CheckpointError, match="step_00000009 is missing"):
        checkpoint.load_sharded(tmp_path, _state(), step=9)
    (tmp_path / "latest").write_text("{oops")
    with pytest.raises(CheckpointError, match="corrupt checkpoint pointer"):
        checkpoint.latest_step(tmp_path)
    with pytest.raises(CheckpointError, match="must be tensors"):
        checkpoint.save_sharded(tmp_path, 2, {"lr": 0.1})
    assert json.loads((tmp_path / "step_00000001" / "extra.json").read_text()) == {"step": 1}


class _WritesAFile:
    """Unpickled, this would create ``path``: what a crafted ``.metadata`` could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_metadata_file_runs_no_code(tmp_path):
    checkpoint.save_sharded(tmp_path, 1, _state())
    marker = tmp_path / "pwned"
    metadata = tmp_path / "step_00000001" / ".metadata"
    metadata.write_bytes(pickle.dumps(_WritesAFile(marker)))
    with pytest.raises(CheckpointError, match=r"step_00000001/\.metadata is not a checkpoint"):
        checkpoint.load_sharded(tmp_path, _zeros_like(_state()))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_saved_entry_that_is_not_a_tensor_is_refused(tmp_path):
    # DCP stores a non-tensor value as a pickle and unpickles it on load: we never load one.
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step_00000001"
    dcp.save({"w": torch.zeros(2), "opts": {"lr": 0.1}}, checkpoint_id=folder)
    (folder / "extra.json").write_text('{"step": 1}')
    (tmp_path / "latest").write_text('{"step": 1, "dir": "step_00000001"}')
    with pytest.raises(CheckpointError, match=r"not a tensor .*: opts\.lr"):
        checkpoint.load_sharded(tmp_path, {"w": torch.zeros(2), "opts": {"lr": torch.zeros(())}})


def test_resume_with_a_crafted_metadata_file_is_refused(tmp_path):
    out = tmp_path / "run"
    checkpoint.save_sharded(out / "checkpoints", 1, _state())
    marker = tmp_path / "pwned"
    metadata = out / "checkpoints" / "step_00000001" / ".metadata"
    metadata.write_bytes(pickle.dumps(_WritesAFile(marker)))
    with pytest.raises(SystemExit, match=r"--resume: .*\.metadata is not a checkpoint"):
        main(["clip", "--resume", "--out", str(out), "--steps", "2", "--batch-size", "2"])
    assert not marker.exists()
