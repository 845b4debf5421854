"""The one training loop (train.loop), driven through ``python -m train clip`` for a few
tiny steps: the files every run writes, exact resume after a crash, refusals that leave no
directory behind, ``--config`` replays, and the figures named for what they are."""

import json

import pytest
import torch
from safetensors.torch import load_file

from train.__main__ import main
from train.loop import records
from train.recipes import clip as clip_recipe

TINY = ["--batch-size", "4", "--eval-per-class", "1"]
EVERY_RUN = {"config.json", "loss.png", "manifest.json", "metrics.json", "metrics.jsonl",
             "params.safetensors", "run.json"}  # fmt: skip


def _lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _params(run):
    return load_file(run / "params.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Six steps in one go: what an interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("loop") / "straight"
    main(["clip", "--out", str(out), "--steps", "6", *TINY])
    return out


def test_a_run_writes_every_file_and_its_wrote_line_names_them(tmp_path, capsys):
    out = tmp_path / "run"
    main(["clip", "--out", str(out), "--steps", "2", *TINY])
    names = {p.name for p in out.iterdir()}
    assert EVERY_RUN | {"tokenizer.json", "zero_shot.png"} == names
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote")]
    assert wrote == [f"wrote {out}/: {' '.join(sorted(names))}"]
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert {"run.json", "metrics.jsonl", "metrics.json", "tokenizer.json"} <= manifest.keys()


def test_final_loss_is_the_last_step_and_the_mean_is_named(straight):
    lines = _lines(straight)
    metrics = json.loads((straight / "metrics.json").read_text())
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert metrics["final_loss"] == round(lines[-1]["loss"], 6)
    mean = sum(r["loss"] for r in lines) / len(lines)
    assert metrics["mean_last_50_steps"]["loss"] == round(mean, 6)
    assert metrics["final_loss"] != metrics["mean_last_50_steps"]["loss"]
    # the first step (compilation, with --compile) is timed apart from the rest
    assert metrics["first_step_seconds"] > 0 and metrics["train_seconds"] > 0
    rate = 5 * 4 / metrics["train_seconds"]  # 5 steps after the first, 4 examples each
    assert metrics["examples_per_second"] == pytest.approx(rate, rel=0.02, abs=0.05)  # rounded
    assert 0 <= metrics["data_wait_fraction"] < 1


def test_a_crashed_run_resumes_bit_for_bit(straight, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    draw, drawn = clip_recipe.captioned_scenes, []

    def crash_at_the_fifth_batch(*args):
        drawn.append(1)
        if len(drawn) == 1 + 5:  # the first batch is drawn once to check it
            raise KeyboardInterrupt("the machine went away")
        return draw(*args)

    monkeypatch.setattr(clip_recipe, "captioned_scenes", crash_at_the_fifth_batch)
    argv = ["clip", "--out", str(out), "--steps", "6", "--checkpoint-every", "3", *TINY]
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert [r["step"] for r in _lines(out)] == [1, 2, 3, 4]  # step 4 was logged, then the crash
    monkeypatch.setattr(clip_recipe, "captioned_scenes", draw)
    main([*argv, "--resume"])
    # steps 4-6 from the step-3 checkpoint: the step-4 line the crash left is not kept twice
    assert _lines(out) == _lines(straight)
    want, got = _params(straight), _params(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == 3


def test_an_existing_run_is_refused_unless_overwritten(straight, tmp_path):
    with pytest.raises(SystemExit, match="holds a run already: pass --overwrite"):
        main(["clip", "--out", str(straight), "--steps", "1", *TINY])
    out = tmp_path / "again"
    main(["clip", "--out", str(out), "--steps", "2", "--checkpoint-every", "1", *TINY])
    main(["clip", "--out", str(out), "--steps", "1", "--overwrite", *TINY])
    assert [r["step"] for r in _lines(out)] == [1]
    assert not (out / "checkpoints").exists()  # the old run's checkpoints went with it
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"")
    with pytest.raises(SystemExit, match="holds files that are not a run"):
        main(["clip", "--out", str(other), "--steps", "1", "--overwrite", *TINY])
    assert [p.name for p in other.iterdir()] == ["cat.jpg"]


def test_refusals_leave_no_run_directory(tmp_path, monkeypatch):
    out = tmp_path / "never"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": 2, "learning_rate": 1}))
    with pytest.raises(SystemExit, match="unknown key 'learning_rate'"):
        main(["clip", "--out", str(out), "--config", str(bad), *TINY])
    with pytest.raises(SystemExit, match="--resume: no completed checkpoint"):
        main(["clip", "--out", str(out), "--resume", *TINY])
    monkeypatch.setattr(records, "tensorboard_available", lambda: False)
    with pytest.raises(SystemExit, match="--log tensorboard needs the tensorboard package"):
        main(["clip", "--out", str(out), "--log", "tensorboard", *TINY])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=r"2 processes .* without --dist"):
        main(["clip", "--out", str(out), *TINY])
    assert not out.exists()


def test_a_batch_unlike_the_family_fields_is_refused_before_step_1(tmp_path, monkeypatch):
    draw = clip_recipe.captioned_scenes

    def float_tokens(*args):
        batch = draw(*args)
        return {**batch, "tokens": batch["tokens"].float()}

    monkeypatch.setattr(clip_recipe, "captioned_scenes", float_tokens)
    with pytest.raises(ValueError, match=r"the data: batch\['tokens'\] must be int64"):
        main(["clip", "--out", str(tmp_path / "never"), "--steps", "1", *TINY])
    assert not (tmp_path / "never").exists()


def test_config_replays_a_run_and_flags_override_it(straight, tmp_path):
    out = tmp_path / "replayed"
    main(["clip", "--config", str(straight / "run.json"), "--out", str(out), "--steps", "2"])
    replayed = json.loads((out / "run.json").read_text())
    original = json.loads((straight / "run.json").read_text())
    assert replayed == {**original, "out": str(out), "steps": 2}
    # the same two steps as the original's first two
    assert _lines(out) == _lines(straight)[:2]
    yaml_file = tmp_path / "flags.yaml"
    yaml_file.write_text("steps: 1\nbatch-size: 4\neval_per_class: 1\nlr: 0.002\n")
    main(["clip", "--config", str(yaml_file), "--out", str(tmp_path / "y")])
    assert json.loads((tmp_path / "y" / "run.json").read_text())["lr"] == 0.002
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**original, "recipe": "flava"}))
    with pytest.raises(SystemExit, match="is a run of the 'flava' recipe"):
        main(["clip", "--config", str(other)])


def test_the_clock_times_the_first_step_apart():
    clock = records.Clock()
    for seconds in (30.0, 0.5, 0.5):
        clock.step(seconds)
    report = clock.report(8)
    assert report["first_step_seconds"] == 30.0 and report["train_seconds"] == 1.0
    assert report["examples_per_second"] == 16.0


def test_log_tensorboard_writes_every_step_metric(tmp_path, monkeypatch):
    # The tensorboard package is optional (not installed here): a stand-in SummaryWriter
    # records what the loop writes through torch.utils.tensorboard's API.
    import sys
    import types

    written = []

    class SummaryWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            written.append(("closed",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr(records, "tensorboard_available", lambda: True)
    out = tmp_path / "tb"
    main(["clip", "--out", str(out), "--steps", "2", "--log", "tensorboard", *TINY])
    assert written[0] == ("dir", str(out / "tensorboard")) and written[-1] == ("closed",)
    logged = {w for w in written if w[0].startswith("train/")}
    names = {k for r in _lines(out) for k in r if k != "step"}
    assert logged == {(f"train/{k}", s) for k in names for s in (1, 2)}


def test_a_replayed_repeatable_flag_keeps_every_value(tmp_path):
    import argparse

    from train.loop.flags import config_defaults

    parser = argparse.ArgumentParser()
    parser.add_argument("--template", action="append", type=str.strip, default=None)
    parser.add_argument("--steps", type=int)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"recipe": "clip", "template": [" a {}. ", "{}"], "steps": 3}))
    assert config_defaults(parser, path, recipe="clip") == {"template": ["a {}.", "{}"], "steps": 3}
    path.write_text(json.dumps({"steps": [1, 2]}))
    with pytest.raises(ValueError, match=r"steps \(--steps\) takes one value"):
        config_defaults(parser, path, recipe="clip")
