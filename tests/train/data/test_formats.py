"""train.data.formats: each format built on the fly opens to the samples written, sniffed
from the path; bad input is one error naming the flag or key. Tables, folders and annotation
files (csv, tsv, jsonl, caption folders, imagefolder, coco, karpathy, vqa) here; webdataset
shards and Hugging Face datasets in test_formats_wds_hf.py."""

import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.data.formats import FORMATS, open_table, sniff
from train.data.images import decode


def write_png(path: Path, value: int, size=(5, 3)) -> bytes:
    """A ``size`` PNG of colour ``(value, 255 - value, 7)`` at ``path``; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # PNG whatever the name says: exact pixels to compare (PIL reads by content).
    Image.new("RGB", size, (value, 255 - value, 7)).save(path, format="PNG")
    return path.read_bytes()


def colour_of(table, i) -> tuple:
    """The top-left pixel of ``table``'s image ``i``, decoded."""
    return tuple(np.asarray(decode(table.image_bytes(i), where=table.where(i)))[0, 0])


def test_csv_rows_resolve_against_the_files_folder(tmp_path):
    write_png(tmp_path / "images" / "a.png", 10)
    write_png(tmp_path / "images" / "b.png", 20)
    with open(tmp_path / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerow(["images/a.png", "a red, quoted thing"])
        writer.writerow(["images/b.png", "  "])
        writer.writerow(["images/a.png", "a second caption"])
        writer.writerow([str(tmp_path / "images" / "b.png"), "absolute"])
    table = open_table(tmp_path / "train.csv")
    assert (table.format, table.kind, len(table)) == ("csv", "pairs", 4)
    assert [table.texts(i) for i in range(4)] == [
        ("a red, quoted thing",),
        (),
        ("a second caption",),
        ("absolute",),
    ]
    assert table.where(0) == "images/a.png"
    assert [colour_of(table, i)[0] for i in range(4)] == [10, 20, 10, 20]


def test_tsv_and_other_keys_and_a_separator_flag(tmp_path):
    write_png(tmp_path / "x.png", 30)
    (tmp_path / "data.tsv").write_text("image\tcaption\nx.png\ta cat\n")
    table = open_table(tmp_path / "data.tsv", img_key="image", caption_key="caption")
    assert (table.format, table.texts(0), colour_of(table, 0)[0]) == ("tsv", ("a cat",), 30)
    (tmp_path / "semi.csv").write_text("filepath;title\nx.png;a dog\n")
    assert open_table(tmp_path / "semi.csv", separator=";").texts(0) == ("a dog",)
    with pytest.raises(ValueError, match=r"has no 'filepath' \(--csv-img-key\).*separator"):
        open_table(tmp_path / "semi.csv")


def test_jsonl_with_caption_lists(tmp_path):
    write_png(tmp_path / "p" / "x.png", 40)
    lines = [
        {"filepath": "p/x.png", "title": ["one", "two"]},
        {"filepath": "p/x.png", "title": "three"},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    table = open_table(tmp_path / "d.jsonl")
    assert (table.format, len(table)) == ("jsonl", 2)
    assert table.texts(0) == ("one", "two") and table.texts(1) == ("three",)
    assert colour_of(table, 1)[0] == 40


def test_caption_folder_nested_with_and_without_captions(tmp_path):
    write_png(tmp_path / "00000" / "000.jpg", 1)
    (tmp_path / "00000" / "000.txt").write_text("a red circle\n")
    (tmp_path / "00000" / "000.json").write_text("{}")
    write_png(tmp_path / "00001" / "001.png", 2)
    (tmp_path / "00001" / "001.txt").write_text("")
    write_png(tmp_path / "00001" / "002.webp", 3)
    (tmp_path / "00000.parquet").write_bytes(b"img2dataset's url list")
    (tmp_path / ".hidden").mkdir()
    write_png(tmp_path / ".hidden" / "x.png", 9)
    assert sniff(str(tmp_path)) == "folder"
    table = open_table(tmp_path)
    assert [table.where(i) for i in range(len(table))] == [
        "00000/000.jpg",
        "00001/001.png",
        "00001/002.webp",
    ]
    assert [table.texts(i) for i in range(3)] == [("a red circle",), (), ()]


def test_imagefolder_classes_sorted_and_readable(tmp_path):
    for name, values in (("golden_retriever", (1, 2)), ("cat", (3,)), ("zebra", (4, 5))):
        for v in values:
            write_png(tmp_path / name / "deep" / f"{v}.png", v)
    assert sniff(str(tmp_path)) == "imagefolder"
    table = open_table(tmp_path)
    assert (table.kind, len(table)) == ("classes", 5)
    assert table.classes == ("cat", "golden_retriever", "zebra")
    assert table.class_names == ("cat", "golden retriever", "zebra")
    labels = [table.label(i) for i in range(5)]
    assert labels == [0, 1, 1, 2, 2]
    assert [colour_of(table, i)[0] for i in range(5)] == [3, 1, 2, 4, 5]
    assert table.where(0) == "cat/deep/3.png" and table.texts(0) == ()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: a class folder without images"):
        open_table(tmp_path)


def test_tables_pickle_small_and_equal(tmp_path):
    write_png(tmp_path / "a.png", 10)
    (tmp_path / "t.csv").write_text("filepath,title\n" + "a.png,x\n" * 1000)
    table = open_table(tmp_path / "t.csv")
    again = pickle.loads(pickle.dumps(table))
    assert len(again) == 1000 and again.image_bytes(999) == table.image_bytes(0)
    assert len(pickle.dumps(table)) < 20_000


def test_sniffing_and_its_errors(tmp_path):
    for name in ("a.csv", "a.tsv", "a.jsonl", "a.tar", "a.parquet"):
        (tmp_path / name).write_text("")
    assert [
        sniff(str(tmp_path / n)) for n in ("a.csv", "a.tsv", "a.jsonl", "a.tar", "a.parquet")
    ] == ["csv", "tsv", "jsonl", "wds", "hf"]
    assert sniff(str(tmp_path / "shards/{000..009}.tar")) == "wds"
    assert sniff(str(tmp_path / "*.parquet")) == "hf"
    (tmp_path / "notes.md").write_text("")
    with pytest.raises(ValueError, match="--data-format, one of: csv, tsv, jsonl"):
        sniff(str(tmp_path / "notes.md"))
    (tmp_path / "x.json").write_text('{"something": 1}')
    with pytest.raises(ValueError, match=r"cannot tell its format.*--data-format"):
        sniff(str(tmp_path / "x.json"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_table(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="--data-format 'xml' is not one of"):
        open_table(tmp_path / "a.csv", format="xml")
    assert "imagefolder" in FORMATS


def test_explicit_format_wins(tmp_path):
    write_png(tmp_path / "x.png", 50)
    (tmp_path / "list.txt").write_text("filepath,title\nx.png,hello\n")
    table = open_table(tmp_path / "list.txt", format="csv")
    assert table.texts(0) == ("hello",)


def test_missing_columns_name_the_key_the_flag_and_what_is_there(tmp_path):
    (tmp_path / "t.csv").write_text("path,caption\nx.png,a\n")
    with pytest.raises(
        ValueError, match=r"t.csv has no 'filepath' \(--csv-img-key\); it has: 'path', 'caption'"
    ):
        open_table(tmp_path / "t.csv")
    with pytest.raises(ValueError, match=r"no 'title' \(--csv-caption-key\)"):
        open_table(tmp_path / "t.csv", img_key="path")
    (tmp_path / "t.jsonl").write_text('{"path": "x.png"}\n')
    with pytest.raises(
        ValueError, match=r"t.jsonl line 1 has no 'filepath' \(--csv-img-key\); it has: 'path'"
    ):
        open_table(tmp_path / "t.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"filepath": "x.png", "title": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not JSON"):
        open_table(tmp_path / "bad.jsonl")


def test_an_empty_table_is_an_error(tmp_path):
    (tmp_path / "t.csv").write_text("filepath,title\n")
    with pytest.raises(ValueError, match=r"t.csv: no samples"):
        open_table(tmp_path / "t.csv")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.txt").write_text("a caption without an image")
    with pytest.raises(ValueError, match="f: no images"):
        open_table(tmp_path / "f")


def test_a_missing_image_fails_on_read_not_on_open(tmp_path):
    (tmp_path / "t.csv").write_text("filepath,title\ngone.png,a\n")
    table = open_table(tmp_path / "t.csv")
    with pytest.raises(OSError):
        table.image_bytes(0)


def test_pixels_survive_the_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    (tmp_path / "r.png").write_bytes(buffer.getvalue())
    (tmp_path / "t.csv").write_text("filepath,title\nr.png,x\n")
    table = open_table(tmp_path / "t.csv")
    np.testing.assert_array_equal(np.asarray(decode(table.image_bytes(0), where="r")), rgb)


def test_coco_captions_several_per_image(tmp_path):
    write_png(tmp_path / "imgs" / "1.jpg", 1)
    write_png(tmp_path / "imgs" / "2.jpg", 2)
    data = {
        "images": [{"id": 11, "file_name": "1.jpg"}, {"id": 12, "file_name": "2.jpg"}],
        "annotations": [
            {"image_id": 12, "caption": "two a"},
            {"image_id": 11, "caption": "one a"},
            {"image_id": 12, "caption": "two b "},
        ],
    }
    (tmp_path / "captions_val2017.json").write_text(json.dumps(data))
    assert sniff(str(tmp_path / "captions_val2017.json")) == "coco"
    with pytest.raises(ValueError, match="--data-format coco needs --image-root"):
        open_table(tmp_path / "captions_val2017.json")
    table = open_table(tmp_path / "captions_val2017.json", image_root=tmp_path / "imgs")
    assert len(table) == 2 and table.texts(0) == ("one a",) and table.texts(1) == ("two a", "two b")
    assert colour_of(table, 1)[0] == 2 and table.where(1) == "2.jpg"
    data["annotations"].append({"image_id": 99, "caption": "lost"})
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[3\]: image_id 99 is not in 'images'"):
        open_table(tmp_path / "bad.json", format="coco", image_root=tmp_path / "imgs")


def test_karpathy_splits_restval_counts_as_train(tmp_path):
    write_png(tmp_path / "coco" / "val2014" / "a.jpg", 1)
    write_png(tmp_path / "coco" / "train2014" / "b.jpg", 2)
    write_png(tmp_path / "coco" / "val2014" / "c.jpg", 3)
    images = [
        {
            "filepath": "val2014",
            "filename": "a.jpg",
            "split": "restval",
            "sentences": [{"raw": "A."}],
        },
        {
            "filepath": "train2014",
            "filename": "b.jpg",
            "split": "train",
            "sentences": [{"raw": "B."}, {"raw": "b2"}],
        },
        {"filepath": "val2014", "filename": "c.jpg", "split": "test", "sentences": [{"raw": "C."}]},
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    path = tmp_path / "dataset_coco.json"
    assert sniff(str(path)) == "karpathy"
    with pytest.raises(
        ValueError,
        match=r"--split must be one of train \(2 images\), val \(0 images\), test \(1 images\)",
    ):
        open_table(path, image_root=tmp_path / "coco")
    train = open_table(path, image_root=tmp_path / "coco", split="train")
    assert [train.where(i) for i in range(2)] == ["val2014/a.jpg", "train2014/b.jpg"]
    assert train.texts(1) == ("B.", "b2") and colour_of(train, 1)[0] == 2
    test = open_table(path, image_root=tmp_path / "coco", split="test")
    assert len(test) == 1 and test.texts(0) == ("C.",) and colour_of(test, 0)[0] == 3
    with pytest.raises(ValueError, match="no samples"):
        open_table(path, image_root=tmp_path / "coco", split="val")


def test_vqa_v2_question_and_annotation_files(tmp_path):
    write_png(tmp_path / "train2014" / "COCO_train2014_000000000042.jpg", 42)
    questions = {
        "data_subtype": "train2014",
        "questions": [
            {"question_id": 1, "image_id": 42, "question": "What colour? "},
            {"question_id": 2, "image_id": 42, "question": "How many?"},
        ],
    }
    notes = {"annotations": [
        {"question_id": 2, "answers": [{"answer": "2"}, {"answer": "two"}, {"answer": "2"}]},
        {"question_id": 1, "answers": [{"answer": "red"}]},
    ]}  # fmt: skip
    q = tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json"
    q.write_text(json.dumps(questions))
    assert sniff(str(q)) == "vqa"
    with pytest.raises(
        ValueError,
        match=r"no annotations beside it .*v2_mscoco_train2014_annotations.json.*--vqa-annotations",
    ):
        open_table(q, image_root=tmp_path / "train2014")
    (tmp_path / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(notes))
    table = open_table(q, image_root=tmp_path / "train2014")
    assert (table.kind, len(table)) == ("vqa", 2)
    assert table.texts(0) == ("What colour?",) and table.answers(1) == ("2", "two", "2")
    assert colour_of(table, 1)[0] == 42
    elsewhere = tmp_path / "notes.json"
    elsewhere.write_text(json.dumps(notes))
    moved = tmp_path / "other" / "q.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps(questions))
    table = open_table(moved, image_root=tmp_path / "train2014", annotations=elsewhere)
    assert table.answers(0) == ("red",)


def test_vqa_list_form(tmp_path):
    write_png(tmp_path / "imgs" / "a.png", 9)
    entries = [
        {"image": "imgs/a.png", "question": "Is it red?", "answer": ["no", "no", "yes"]},
        {"image": "imgs/a.png", "question": "Any answer?"},
    ]
    (tmp_path / "vqa_test.json").write_text(json.dumps(entries))
    table = open_table(tmp_path / "vqa_test.json")
    assert (
        table.kind == "vqa" and table.answers(0) == ("no", "no", "yes") and table.answers(1) == ()
    )
    assert table.texts(1) == ("Any answer?",) and colour_of(table, 0)[0] == 9
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.png", "q": "?"}]))
    with pytest.raises(ValueError, match=r"bad.json \[0\] has no 'question'; it has: 'image', 'q'"):
        open_table(tmp_path / "bad.json", format="vqa")
