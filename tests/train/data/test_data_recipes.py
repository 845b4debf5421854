"""--data in the recipes end to end: clip trains on a CSV table, resumes bit for bit
mid-epoch, and refuses a table of the wrong kind before a run directory exists."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.__main__ import cli, main
from train.data import WorldConfig
from train.data.pipeline import LoaderSource
from train.data.tokenizers import BPETokenizer
from train.loop import load_run

from .test_pipeline import write_csv

TINY = ["--batch-size", "4", "--eval-per-class", "1", "--workers", "1"]


@pytest.fixture(scope="module")
def table_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("pairs"), 14)


def test_clip_trains_on_a_csv_table_and_saves_its_bpe(table_csv, tmp_path):
    out = tmp_path / "run"
    main(["clip", "--data", str(table_csv), "--steps", "3", "--out", str(out), *TINY])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_samples"] == 0 and metrics["epochs"] == 1  # 3 batches an epoch
    assert metrics["steps"] == 3 and np.isfinite(metrics["final_loss"])
    run = load_run(out, family="clip")
    assert isinstance(run.tokenizer, BPETokenizer)
    assert run.cfg.vocab_size == run.tokenizer.vocab_size
    assert run.config["data"] == str(table_csv)
    assert run.config["image_mean"] == [0.5] * 3 and run.config["image_std"] == [0.25] * 3
    assert json.loads((out / "run.json").read_text())["data"] == str(table_csv)


def test_a_crashed_data_run_resumes_bit_for_bit(table_csv, tmp_path, monkeypatch):
    # 14 samples in batches of 4 are 3 batches an epoch: the crash after step 4 and the
    # checkpoint at step 4 are mid-epoch; steps 5-7 cross into the third epoch.
    argv = ["clip", "--data", str(table_csv), "--steps", "7", "--checkpoint-every", "4", *TINY]
    straight = tmp_path / "straight"
    main([*argv, "--out", str(straight)])
    real, drawn = LoaderSource.__next__, []

    def crash_at_the_sixth_batch(self):
        drawn.append(1)
        if len(drawn) == 1 + 6:  # the first batch is drawn once to check it
            raise KeyboardInterrupt("the machine went away")
        return real(self)

    monkeypatch.setattr(LoaderSource, "__next__", crash_at_the_sixth_batch)
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(crashed)])
    monkeypatch.setattr(LoaderSource, "__next__", real)
    main([*argv, "--out", str(crashed), "--resume"])
    assert json.loads((crashed / "metrics.json").read_text())["resumed_from"] == 4
    lines = lambda out: [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines(crashed) == lines(straight)
    want, got = (load_file(out / "params.safetensors") for out in (straight, crashed))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def _one_line_error(capsys, argv, named):
    try:
        code = cli(argv)
    except SystemExit as exit_:  # argparse refusals leave from inside the parser
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert named in err, err


def test_wrong_kind_and_missing_data_are_refused_before_a_run_dir(tmp_path, capsys):
    classes = tmp_path / "heldout"
    for name in ("red_circle", "blue_square"):
        (classes / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), name.split("_")[0]).save(classes / name / "0.png")
    out = tmp_path / "run"
    _one_line_error(capsys, ["clip", "--data", str(classes), "--out", str(out)],
                    "is an ImageFolder of classes (no captions): `python -m train clip` trains "
                    "on image-caption pairs")  # fmt: skip
    _one_line_error(capsys, ["clip", "--data", str(tmp_path / "nope.csv"), "--out", str(out)],
                    "no such file or folder")  # fmt: skip
    assert not out.exists()


def test_flava_and_albef_retrieval_train_on_the_table(table_csv, tmp_path):
    flava_out, albef_out = tmp_path / "flava", tmp_path / "albef"
    main(["flava", "--data", str(table_csv), "--steps", "2", "--out", str(flava_out),
          "--eval-scenes", "8", *TINY])  # fmt: skip
    main(["albef", "--data", str(table_csv), "--steps", "2", "--out", str(albef_out), *TINY])
    for out, family in ((flava_out, "flava"), (albef_out, "albef")):
        run = load_run(out, family=family)
        assert isinstance(run.tokenizer, BPETokenizer) and run.config["data"] == str(table_csv)
        assert json.loads((out / "metrics.json").read_text())["skipped_samples"] == 0


def test_albef_vqa_trains_on_a_vqa_table_with_its_answers(table_csv, tmp_path):
    rows = list(csv.DictReader(table_csv.read_text().splitlines()))
    colour = lambda caption: next(w for w in caption.split() if w in WorldConfig().colors)
    questions = [
        {"image": r["filepath"], "question": "what colour is it?",
         "answer": [colour(r["title"])] * 2 + ["blue"]}
        for r in rows
    ]  # fmt: skip
    path = table_csv.parent / "vqa.json"
    path.write_text(json.dumps(questions))
    out = tmp_path / "vqa"
    main(["albef", "--task", "vqa", "--data", str(path), "--steps", "2", "--out", str(out), *TINY])
    config = json.loads((out / "config.json").read_text())
    assert set(config["answers"]) == {colour(r["title"]) for r in rows} | {"blue"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["vqa_train_accuracy"] <= 1 and metrics["skipped_samples"] == 0
    with pytest.raises(ValueError, match="is image-caption pairs: `python -m train albef`"):
        main(["albef", "--task", "vqa", "--data", str(table_csv), "--out", str(tmp_path / "x")])
