"""python -m train export-shapes: every format opens (train.data.formats) to the same
scenes, pixel for pixel and caption for caption; the val split and the held-out
ImageFolder; a non-empty DIR is refused; a killed export never looks complete."""

import json

import numpy as np
import pytest

from train.__main__ import cli
from train.data.formats import open_table
from train.data.images import decode
from train.data.shapes import WorldConfig, class_names
from train.recipes import export_shapes
from train.recipes.export_shapes import export

N, VAL, PER_CLASS = 37, 9, 2


def _samples(table):
    return [
        (np.asarray(decode(table.image_bytes(i), where=table.where(i))), table.texts(i))
        for i in range(len(table))
    ]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_shapes, "PER_SHARD", 10)  # several shards, the last one short
        patch.setattr(export_shapes, "_HF_CHUNK", 16)  # several Arrow chunks joined
        return {
            f: (root / f, export(root / f, format=f, n=N, seed=3, image_size=32, per_class=PER_CLASS, val_n=VAL))
            for f in export_shapes.FORMATS
        }  # fmt: skip


def test_every_format_opens_to_the_same_scenes(exports):
    reference = None
    for format, (_, data) in exports.items():
        table = open_table(data)
        assert table.format == format and len(table) == N
        samples = _samples(table)
        assert all(image.shape == (32, 32, 3) and len(texts) == 1 for image, texts in samples)
        if reference is None:
            reference = samples
            continue
        for (image, texts), (ref_image, ref_texts) in zip(samples, reference):
            np.testing.assert_array_equal(image, ref_image)
            assert texts == ref_texts
    assert len({texts for _, texts in reference}) > N // 2  # varied captions
    assert all(t[0].split()[0] in ("a", "there", "an") for _, t in reference)


def test_layout_of_each_format(exports):
    assert (exports["csv"][1].name, exports["folder"][1].name) == ("train.csv", "train")
    shards = sorted(p.name for p in exports["wds"][1].iterdir())
    assert shards == [f"shard-{k:06d}.tar" for k in range(4)]
    assert (exports["hf"][1] / "dataset_info.json").is_file()
    assert not list(exports["hf"][0].glob(".hf-chunk-*"))  # the chunks are removed
    folder = exports["folder"][1]
    assert (folder / "000036.png").is_file() and (folder / "000036.txt").is_file()
    settings = json.loads((exports["wds"][0] / "export.json").read_text())
    assert (
        settings["n"] == N
        and settings["data"] == "shards"
        and settings["world"]["image_size"] == 32
    )


def test_val_split_and_heldout_imagefolder(exports):
    root = exports["csv"][0]
    val = open_table(root / "val.csv")
    assert len(val) == VAL and all(len(val.texts(i)) == 1 for i in range(VAL))
    train = _samples(open_table(exports["csv"][1]))
    assert not any(np.array_equal(_samples(val)[0][0], image) for image, _ in train)  # another seed
    heldout = open_table(root / "heldout")
    names = class_names(WorldConfig())
    assert heldout.kind == "classes" and len(heldout) == 48 * PER_CLASS
    assert heldout.classes == tuple(sorted(n.replace(" ", "_") for n in names))
    assert set(heldout.class_names) == set(names)
    for colour, shape in WorldConfig().holdout:  # the combinations training never shows
        assert f"{colour}_{shape}" in heldout.classes
    labels = [heldout.label(i) for i in range(len(heldout))]
    assert labels == sorted(labels) and labels.count(0) == PER_CLASS
    # Every format shares the val split and the held-out images.
    other = exports["wds"][0]
    assert (other / "val.csv").read_bytes() == (root / "val.csv").read_bytes()
    assert (
        _samples(open_table(other / "heldout"))[5][0].tobytes() == _samples(heldout)[5][0].tobytes()
    )


def test_a_non_empty_dir_is_refused_without_overwrite(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="is not empty: pass --overwrite"):
        export(tmp_path / "d", format="csv", n=3, image_size=16, per_class=1, val_n=2)
    assert (tmp_path / "d" / "mine.txt").read_text() == "keep me"
    export(tmp_path / "d", format="csv", n=3, image_size=16, per_class=1, val_n=2, overwrite=True)
    assert (
        not (tmp_path / "d" / "mine.txt").exists()
        and len(open_table(tmp_path / "d" / "train.csv")) == 3
    )
    (tmp_path / "empty").mkdir()
    export(tmp_path / "empty", format="folder", n=2, image_size=16, per_class=1, val_n=1)
    assert len(open_table(tmp_path / "empty" / "train")) == 2


def test_a_killed_export_never_looks_complete(tmp_path, monkeypatch):
    real = export_shapes.pngs
    calls = []

    def dies_on_the_second_batch(images):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(images)

    monkeypatch.setattr(export_shapes, "pngs", dies_on_the_second_batch)
    monkeypatch.setattr(export_shapes, "_BATCH", 4)
    with pytest.raises(KeyboardInterrupt):
        export(tmp_path / "d", format="folder", n=10, image_size=16, per_class=1, val_n=2)
    assert not (tmp_path / "d").exists() and (tmp_path / "d.partial").is_dir()
    monkeypatch.setattr(export_shapes, "pngs", real)
    export(tmp_path / "d", format="folder", n=10, image_size=16, per_class=1, val_n=2)
    assert not (tmp_path / "d.partial").exists() and len(open_table(tmp_path / "d" / "train")) == 10


def test_cli_prints_what_it_wrote_and_the_command_to_train(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert (
        cli(
            [
                "export-shapes",
                str(out),
                "--format",
                "csv",
                "--n",
                "5",
                "--val-n",
                "3",
                "--per-class",
                "1",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith(
        f"wrote 5 training scenes (csv: {out / 'train.csv'}), 3 retrieval scenes"
    )
    assert line.endswith(
        f"python -m train clip --data {out / 'train.csv'} --val-data {out / 'val.csv'} "
        f"--zeroshot-data {out / 'heldout'} --out runs/shapes-csv"
    )
    assert open_table(out / "train.csv").image_bytes(0)[:4] == b"\x89PNG"
    assert decode(open_table(out / "train.csv").image_bytes(0), where="x").size == (64, 64)
    assert cli(["export-shapes", str(out), "--format", "csv", "--n", "5"]) == 2
    assert "is not empty: pass --overwrite" in capsys.readouterr().err


def test_clip_trains_on_every_format_to_the_same_losses(exports, tmp_path):
    from train.__main__ import main

    losses = {}
    for format, (_, data) in exports.items():
        out = tmp_path / format
        main(["clip", "--data", str(data), "--steps", "2", "--batch-size", "8", "--workers", "0",
              "--eval-per-class", "1", "--out", str(out)])  # fmt: skip
        lines = (out / "metrics.jsonl").read_text().splitlines()
        losses[format] = [json.loads(line)["loss"] for line in lines]
    # The same scenes in the same order, whatever the files: the same steps, bit for bit.
    assert len(losses) == len(export_shapes.FORMATS) and len(set(map(tuple, losses.values()))) == 1
