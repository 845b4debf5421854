"""``python -m train coca`` for a few steps: its files, the caption and zero-shot figures in
range (with a CLIP judge), and bad flags refused by name before any directory exists."""

import json

import pytest

from train.__main__ import cli, main
from train.loop import load_run

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--steps", "2", "--batch-size", "4", "--eval-scenes", "6", "--eval-per-class", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("coca")
    main(["clip", "--steps", "1", "--batch-size", "4", "--eval-per-class", "1",
          "--out", str(root / "clip")])  # fmt: skip
    main(["coca", "--judge", str(root / "clip"), "--out", str(root / "run"), *TINY])
    return root


def test_the_run_writes_captions_and_zero_shot_for_seen_and_unseen_scenes(runs):
    out = runs / "run"
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "loss.png", "captions.png", "tokenizer.json"} <= names
    assert (out / "captions.png").read_bytes()[:8] == PNG
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("caption_colour_shape_exact", "caption_colour", "caption_shape"):
        for split in ("", "_seen", "_unseen"):
            value = metrics[f"{name}{split}"]
            assert value != value or 0.0 <= value <= 1.0, (name, split)  # NaN: no such scene
    assert metrics["caption_colour_shape_exact"] <= min(
        metrics["caption_colour"], metrics["caption_shape"]
    )
    for name in ("zero_shot_top1", "consistency", "consistency_unseen_combos"):
        value = metrics[name]
        assert value != value or 0.0 <= value <= 1.0, name
    assert metrics["zero_shot_classes"] == 48 and metrics["eval_scenes"] == 6
    assert len(metrics["samples"]) == 6 and metrics["steps"] == 2
    run = load_run(out, family="coca")
    assert run.cfg.vocab_size == run.tokenizer.vocab_size


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--eval-scenes", "0"], "--eval-scenes"),
        (["--eval-per-class", "x"], "--eval-per-class"),
        (["--judge", "NO_SUCH_RUN"], "--judge"),
    ],
)
def test_bad_flags_are_refused_by_name_before_any_directory(tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    flags = [f.replace("NO_SUCH_RUN", str(tmp_path / "none")) for f in flags]
    code = None
    try:
        code = cli(["coca", "--out", str(out), *TINY, *flags])
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()
