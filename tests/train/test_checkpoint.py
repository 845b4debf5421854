"""Checkpoints: bit-exact round trips, a run's files saved as one unit, clear errors, nothing
half-loaded."""

import json

import pytest
import torch

import fmm
from models import clip
from train import checkpoint
from train.checkpoint import CheckpointError

CFG = clip.clip_tiny(vocab_size=11, context_length=5)


@pytest.fixture(scope="module")
def params():
    return clip.init(CFG, fmm.random.key(0))


def _equal(a, b):
    fa, fb = fmm.tree.flatten(a), fmm.tree.flatten(b)
    return fa.keys() == fb.keys() and all(
        torch.equal(fa[k], fb[k]) and fa[k].dtype == fb[k].dtype for k in fa
    )


def test_save_then_load_is_bit_exact(tmp_path, params):
    checkpoint.save(tmp_path, params, config={"clip": CFG.to_dict()})
    loaded, config = checkpoint.load(tmp_path, like=clip.init(CFG, fmm.random.key(0).to("meta")))
    assert _equal(loaded, params)
    assert clip.CLIPConfig(**config["clip"]) == CFG


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, params, monkeypatch):
    checkpoint.save(tmp_path, params, config={"v": 1})

    def broken(flat, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(checkpoint, "save_file", broken)
    changed = fmm.tree.map(lambda x: x + 1, params)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, changed, config={"v": 2})
    loaded, config = checkpoint.load(tmp_path)
    assert _equal(loaded, params) and config == {"v": 1}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "manifest.json", "params.safetensors"]


def _unit(step):
    """Every kind of file a recipe saves, each carrying ``step``."""
    return {
        "params": {"w": torch.full((3, 5), float(step))},
        "config": {"step": step},
        "files": {
            "tokenizer.json": json.dumps({"step": step}),
            "metrics.json": {"step": step},
            "extra.safetensors": {"ema": torch.full((7,), float(step))},
            "notes.bin": bytes([step]),
        },
    }


def _steps_read(run_dir):
    """The step each file of the run says, read through one ``open_run``."""
    run = checkpoint.open_run(run_dir)
    return {
        "params": int(run.params()["w"][0, 0]),
        "config": run.config()["step"],
        "tokenizer": json.loads(run.text("tokenizer.json"))["step"],
        "metrics": json.loads(run.text("metrics.json"))["step"],
        "extra": int(run.params("extra.safetensors")["ema"][0]),
        "notes": run.read_bytes("notes.bin")[0],
    }


def test_every_file_of_a_unit_round_trips(tmp_path):
    checkpoint.save(tmp_path, **_unit(3))
    assert set(_steps_read(tmp_path).values()) == {3}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(
        ["params.safetensors", "config.json", *_unit(3)["files"]]
    )
    # plain files under their own names, for anyone to read
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"step": 3}


class _Crash(BaseException):
    """The process dies here (a BaseException: nothing on the way catches it)."""


def _crash_at(monkeypatch, k):
    """Make the k-th durable step (fsync or rename) of what follows die before it runs."""
    count = {"n": 0}
    for name in ("fsync", "replace"):
        real = getattr(checkpoint.os, name)

        def step(*args, _real=real, **kwargs):
            count["n"] += 1
            if count["n"] == k + 1:
                raise _Crash
            return _real(*args, **kwargs)

        monkeypatch.setattr(checkpoint.os, name, step)
    return count


def test_a_crash_at_any_step_of_a_save_leaves_one_whole_save(tmp_path, monkeypatch):
    with monkeypatch.context() as m:  # how many durable steps a save of this unit takes
        count = _crash_at(m, -1)
        checkpoint.save(tmp_path / "probe", **_unit(1))
    steps = count["n"]
    assert steps >= 8
    seen = set()
    for k in range(steps):
        run_dir = tmp_path / f"crash{k}"
        checkpoint.save(run_dir, **_unit(1))
        with monkeypatch.context() as m:
            _crash_at(m, k)
            with pytest.raises(_Crash):
                checkpoint.save(run_dir, **_unit(2))
        before = sorted(p.name for p in run_dir.iterdir())
        read = set(_steps_read(run_dir).values())
        assert len(read) == 1, (k, _steps_read(run_dir))
        assert sorted(p.name for p in run_dir.iterdir()) == before  # reading wrote nothing
        seen |= read
        checkpoint.save(run_dir, **_unit(3))  # the next save rolls forward and cleans up
        assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []
        assert set(_steps_read(run_dir).values()) == {3}
    assert seen == {1, 2}  # crashes before and after the commit point were both reached


def test_files_a_save_does_not_name_stay_checked(tmp_path):
    checkpoint.save(tmp_path, **_unit(1))
    checkpoint.save(tmp_path, {"w": torch.full((3, 5), 2.0)}, config={"step": 2})
    steps = _steps_read(tmp_path)
    assert steps["params"] == steps["config"] == 2 and steps["metrics"] == 1
    (tmp_path / "metrics.json").write_text('{"step": 9}')
    with pytest.raises(CheckpointError, match=r"metrics\.json does not belong"):
        checkpoint.open_run(tmp_path).text("metrics.json")


def test_a_file_copied_from_another_run_is_named(tmp_path, params):
    checkpoint.save(tmp_path / "a", params, config={"run": "a"})
    checkpoint.save(tmp_path / "b", fmm.tree.map(lambda x: x * 2, params), config={"run": "b"})
    (tmp_path / "a" / "params.safetensors").write_bytes(
        (tmp_path / "b" / "params.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match=r"a/params\.safetensors does not belong") as info:
        checkpoint.load(tmp_path / "a")
    assert "\n" not in str(info.value)
    (tmp_path / "a" / "config.json").write_text('{"run": "b"}')
    with pytest.raises(CheckpointError, match=r"a/config\.json does not belong"):
        checkpoint.load_config(tmp_path / "a")


def test_orphans_of_crashed_saves_are_removed_by_the_next_save(tmp_path, params):
    checkpoint.save(tmp_path, params, config={})
    # Ours (staged, atomic_write's) and the one safetensors' writer stages a file under.
    orphans = [".params.safetensors.0123456789ab.staged", ".config.json.abcd_123.tmp", ".tmpIKxpuO"]
    for name in orphans:
        (tmp_path / name).write_bytes(b"x" * 1000)
    (tmp_path / ".hidden-but-mine").write_text("kept")
    checkpoint.load(tmp_path)  # reading removes nothing
    assert all((tmp_path / name).exists() for name in orphans)
    checkpoint.save(tmp_path, params, config={})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [
        ".hidden-but-mine"
    ]


def test_a_save_replaces_a_corrupt_manifest(tmp_path, params):
    checkpoint.save(tmp_path, params, config={"v": 1})
    (tmp_path / "manifest.json").write_text("{half")
    with pytest.warns(UserWarning, match=r"corrupt .*manifest\.json.*this save replaces it"):
        checkpoint.save(tmp_path, params, config={"v": 2})
    assert checkpoint.load_config(tmp_path) == {"v": 2}


def test_runs_saved_before_manifests_still_load(tmp_path, params):
    checkpoint.save_params(tmp_path / "params.safetensors", params)
    checkpoint.write_json(tmp_path / "config.json", {"v": 1})
    (tmp_path / "tokenizer.json").write_text("{}")
    loaded, config = checkpoint.load(tmp_path)
    assert _equal(loaded, params) and config == {"v": 1}
    assert checkpoint.open_run(tmp_path).text("tokenizer.json") == "{}"


def test_corrupt_params_file_is_a_clear_error(tmp_path, params):
    checkpoint.save(tmp_path, params, config={})
    path = tmp_path / checkpoint.PARAMS_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"params\.safetensors does not belong .*corrupt"):
        checkpoint.load(tmp_path)
    (tmp_path / "manifest.json").unlink()  # as a run saved before manifests
    with pytest.raises(CheckpointError, match="corrupt params file"):
        checkpoint.load(tmp_path)


def test_missing_run_and_corrupt_config(tmp_path, params):
    with pytest.raises(CheckpointError, match="not a saved run"):
        checkpoint.load(tmp_path)
    checkpoint.save(tmp_path, params, config={})
    (tmp_path / checkpoint.CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json does not belong"):
        checkpoint.load(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"corrupt .*config\.json"):
        checkpoint.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"files": 3}')
    with pytest.raises(CheckpointError, match=r"corrupt .*manifest\.json"):
        checkpoint.load(tmp_path)


def test_bad_file_names_and_values_are_refused(tmp_path, params):
    for files, message in [
        ({"../x.json": {}}, "not a plain file name"),
        ({".hidden": "x"}, "not a plain file name"),
        ({"manifest.json": {}}, "not a plain file name"),
        ({"config.json": {}}, "written from save's own arguments"),
        ({"table.csv": [1, 2]}, r"files\['table\.csv'\]: give str or bytes"),
    ]:
        with pytest.raises(ValueError, match=message):
            checkpoint.save(tmp_path, params, config={}, files=files)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_mismatched_checkpoint_lists_every_problem(tmp_path, params):
    flat = fmm.tree.flatten(params)
    flat.pop("text.proj.weight")
    flat["text.extra"] = torch.zeros(2)
    flat["logit_scale"] = torch.zeros(3)
    checkpoint.save_params(tmp_path / "p.safetensors", fmm.tree.unflatten(flat))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_params(tmp_path / "p.safetensors", like=params)
    message = str(info.value)
    assert "missing: text.proj.weight" in message
    assert "unexpected: text.extra" in message
    assert "mismatched logit_scale: expected [] torch.float32, got [3] torch.float32" in message
