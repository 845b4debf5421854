"""train.data.formats: each format built on the fly with its own library opens to the
samples written, sniffed from the path; bad input is one error naming the flag or key."""

import csv
import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.formats import FORMATS, open_table, sniff
from train.data.images import decode


def _png(path: Path, value: int, size=(5, 3)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    # PNG whatever the name says: exact pixels to compare (PIL reads by content).
    Image.new("RGB", size, (value, 255 - value, 7)).save(path, format="PNG")
    return path.read_bytes()


def _colour(table, i) -> tuple:
    return tuple(np.asarray(decode(table.image_bytes(i), where=table.where(i)))[0, 0])


def test_csv_rows_resolve_against_the_files_folder(tmp_path):
    _png(tmp_path / "images" / "a.png", 10)
    _png(tmp_path / "images" / "b.png", 20)
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
    assert [_colour(table, i)[0] for i in range(4)] == [10, 20, 10, 20]


def test_tsv_and_other_keys_and_a_separator_flag(tmp_path):
    _png(tmp_path / "x.png", 30)
    (tmp_path / "data.tsv").write_text("image\tcaption\nx.png\ta cat\n")
    table = open_table(tmp_path / "data.tsv", img_key="image", caption_key="caption")
    assert (table.format, table.texts(0), _colour(table, 0)[0]) == ("tsv", ("a cat",), 30)
    (tmp_path / "semi.csv").write_text("filepath;title\nx.png;a dog\n")
    assert open_table(tmp_path / "semi.csv", separator=";").texts(0) == ("a dog",)
    with pytest.raises(ValueError, match=r"has no 'filepath' \(--csv-img-key\).*separator"):
        open_table(tmp_path / "semi.csv")


def test_jsonl_with_caption_lists(tmp_path):
    _png(tmp_path / "p" / "x.png", 40)
    lines = [
        {"filepath": "p/x.png", "title": ["one", "two"]},
        {"filepath": "p/x.png", "title": "three"},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    table = open_table(tmp_path / "d.jsonl")
    assert (table.format, len(table)) == ("jsonl", 2)
    assert table.texts(0) == ("one", "two") and table.texts(1) == ("three",)
    assert _colour(table, 1)[0] == 40


def test_caption_folder_nested_with_and_without_captions(tmp_path):
    _png(tmp_path / "00000" / "000.jpg", 1)
    (tmp_path / "00000" / "000.txt").write_text("a red circle\n")
    (tmp_path / "00000" / "000.json").write_text("{}")
    _png(tmp_path / "00001" / "001.png", 2)
    (tmp_path / "00001" / "001.txt").write_text("")
    _png(tmp_path / "00001" / "002.webp", 3)
    (tmp_path / "00000.parquet").write_bytes(b"img2dataset's url list")
    (tmp_path / ".hidden").mkdir()
    _png(tmp_path / ".hidden" / "x.png", 9)
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
            _png(tmp_path / name / "deep" / f"{v}.png", v)
    assert sniff(str(tmp_path)) == "imagefolder"
    table = open_table(tmp_path)
    assert (table.kind, len(table)) == ("classes", 5)
    assert table.classes == ("cat", "golden_retriever", "zebra")
    assert table.class_names == ("cat", "golden retriever", "zebra")
    labels = [table.label(i) for i in range(5)]
    assert labels == [0, 1, 1, 2, 2]
    assert [_colour(table, i)[0] for i in range(5)] == [3, 1, 2, 4, 5]
    assert table.where(0) == "cat/deep/3.png" and table.texts(0) == ()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: a class folder without images"):
        open_table(tmp_path)


def test_tables_pickle_small_and_equal(tmp_path):
    _png(tmp_path / "a.png", 10)
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
    _png(tmp_path / "x.png", 50)
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


def _encoded(value: int, format: str = "PNG", size=(6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, 7)).save(buffer, format=format)
    return buffer.getvalue()


def _write_shard(path: Path, samples: list[dict]) -> None:
    import webdataset

    path.parent.mkdir(parents=True, exist_ok=True)
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def test_webdataset_shards_by_file_folder_and_brace_pattern(tmp_path):
    shards = tmp_path / "shards"
    for s in range(3):
        _write_shard(
            shards / f"{s:06d}.tar",
            [{"__key__": f"{s}{k:03d}", "png": _encoded(10 * s + k), "txt": f"shard {s} sample {k}"}
             for k in range(4)],
        )  # fmt: skip
    for source in (str(shards), str(shards / "{000000..000002}.tar")):
        table = open_table(source)
        assert (table.format, len(table)) == ("wds", 12)
        assert table.texts(5) == ("shard 1 sample 1",)
        assert _colour(table, 11)[0] == 23
        assert table.where(5) == "000001.tar:1001"
    one = open_table(shards / "000002.tar")
    assert len(one) == 4 and one.texts(0) == ("shard 2 sample 0",)
    with pytest.raises(
        FileNotFoundError, match=r"1 of 4 shards do not exist, the first .*000003.tar"
    ):
        open_table(str(shards / "{000000..000003}.tar"))


def test_webdataset_keys_extensions_and_missing_members(tmp_path):
    shard = tmp_path / "a.tar"
    _write_shard(
        shard,
        [
            {"__key__": "dir/x", "JPG": _encoded(1, "JPEG"), "txt": "upper-case jpg", "json": "{}"},
            {"__key__": "y", "webp": _encoded(2, "WEBP"), "cls": "3"},
            {"__key__": "z", "txt": "a caption without its image"},
            {"__key__": "w", "seg.png": _encoded(3), "txt": "  "},  # key "w", extension "seg.png"
        ],
    )
    table = open_table(shard)
    wheres = [table.where(i) for i in range(len(table))]
    assert wheres == ["a.tar:dir/x", "a.tar:y", "a.tar:z", "a.tar:w"]
    assert (
        table.texts(0) == ("upper-case jpg",) and table.texts(1) == () and _colour(table, 1)[0] < 10
    )
    assert table.texts(3) == ()
    for i, key in ((2, "z"), (3, "w")):  # "seg.png" is no image extension
        with pytest.raises(ValueError, match=f"a.tar:{key}: no jpg/jpeg/png/webp member"):
            table.image_bytes(i)


def test_webdataset_table_pickles_without_handles_and_reads_after(tmp_path):
    _write_shard(
        tmp_path / "s.tar",
        [{"__key__": f"{k:04d}", "png": _encoded(k), "txt": str(k)} for k in range(300)],
    )
    table = open_table(tmp_path / "s.tar")
    assert _colour(table, 7)[0] == 7  # opens a handle
    blob = pickle.dumps(table)
    assert len(blob) < 30_000
    again = pickle.loads(blob)
    assert again.texts(299) == ("299",) and again.image_bytes(3) == table.image_bytes(3)


def test_compressed_or_broken_shard_is_an_error(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match=r"bad.tar: not an uncompressed tar shard"):
        open_table(tmp_path / "bad.tar")


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return datasets


def test_hf_save_to_disk_with_an_image_feature(tmp_path, hf_cache):
    datasets = hf_cache
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {
        "image": [{"bytes": _encoded(v), "path": None} for v in (5, 6, 7)],
        "text": ["a", "b", " "],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    assert sniff(str(tmp_path / "ds")) == "hf"
    table = open_table(tmp_path / "ds")
    assert (table.format, len(table), table.where(2)) == ("hf", 3, "row 2")
    assert [table.texts(i) for i in range(3)] == [("a",), ("b",), ()]
    assert [_colour(table, i)[0] for i in range(3)] == [5, 6, 7]
    again = pickle.loads(pickle.dumps(table))
    assert again.image_bytes(1) == table.image_bytes(1)
    assert len(pickle.dumps(table)) < 50_000


def test_hf_columns_as_paths_and_caption_lists_in_a_dataset_dict(tmp_path, hf_cache):
    datasets = hf_cache
    _png(tmp_path / "ds" / "pics" / "a.png", 33)
    split = datasets.Dataset.from_dict({"file": ["pics/a.png"], "captions": [["one", "two"]]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="has splits train, test: choose one with --split"):
        open_table(tmp_path / "ds", image_column="file", text_column="captions")
    table = open_table(tmp_path / "ds", image_column="file", text_column="captions", split="test")
    assert table.texts(0) == ("one", "two") and _colour(table, 0)[0] == 33
    with pytest.raises(
        ValueError, match=r"has no 'image' \(--image-column\); it has: 'file', 'captions'"
    ):
        open_table(tmp_path / "ds", split="train")


def test_parquet_files_as_a_file_a_folder_and_a_glob(tmp_path, hf_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    for part in range(2):
        images = [{"bytes": _encoded(10 * part + k), "path": None} for k in range(3)]
        texts = [f"part {part} row {k}" for k in range(3)]
        pq.write_table(pa.table({"image": images, "text": texts}), folder / f"{part}.parquet")
    assert sniff(str(folder)) == "hf"
    for source in (folder, str(folder / "*.parquet")):
        table = open_table(source)
        assert len(table) == 6 and table.texts(4) == ("part 1 row 1",)
        assert _colour(table, 4)[0] == 11
    single = open_table(folder / "1.parquet")
    assert len(single) == 3 and single.texts(0) == ("part 1 row 0",)


def test_a_missing_optional_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(
        ValueError,
        match=r"--data-format hf needs the 'datasets' package: pip install 'fmm\[data\]'",
    ):
        open_table(tmp_path / "x.parquet")
    monkeypatch.setitem(sys.modules, "braceexpand", None)
    with pytest.raises(ImportError, match="--data-format wds needs the 'braceexpand' package"):
        open_table(str(tmp_path / "{0..3}.tar"))


def test_coco_captions_several_per_image(tmp_path):
    _png(tmp_path / "imgs" / "1.jpg", 1)
    _png(tmp_path / "imgs" / "2.jpg", 2)
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
    assert _colour(table, 1)[0] == 2 and table.where(1) == "2.jpg"
    data["annotations"].append({"image_id": 99, "caption": "lost"})
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[3\]: image_id 99 is not in 'images'"):
        open_table(tmp_path / "bad.json", format="coco", image_root=tmp_path / "imgs")


def test_karpathy_splits_restval_counts_as_train(tmp_path):
    _png(tmp_path / "coco" / "val2014" / "a.jpg", 1)
    _png(tmp_path / "coco" / "train2014" / "b.jpg", 2)
    _png(tmp_path / "coco" / "val2014" / "c.jpg", 3)
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
    assert train.texts(1) == ("B.", "b2") and _colour(train, 1)[0] == 2
    test = open_table(path, image_root=tmp_path / "coco", split="test")
    assert len(test) == 1 and test.texts(0) == ("C.",) and _colour(test, 0)[0] == 3
    with pytest.raises(ValueError, match="no samples"):
        open_table(path, image_root=tmp_path / "coco", split="val")


def test_vqa_v2_question_and_annotation_files(tmp_path):
    _png(tmp_path / "train2014" / "COCO_train2014_000000000042.jpg", 42)
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
    assert _colour(table, 1)[0] == 42
    elsewhere = tmp_path / "notes.json"
    elsewhere.write_text(json.dumps(notes))
    moved = tmp_path / "other" / "q.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps(questions))
    table = open_table(moved, image_root=tmp_path / "train2014", annotations=elsewhere)
    assert table.answers(0) == ("red",)


def test_vqa_list_form(tmp_path):
    _png(tmp_path / "imgs" / "a.png", 9)
    entries = [
        {"image": "imgs/a.png", "question": "Is it red?", "answer": ["no", "no", "yes"]},
        {"image": "imgs/a.png", "question": "Any answer?"},
    ]
    (tmp_path / "vqa_test.json").write_text(json.dumps(entries))
    table = open_table(tmp_path / "vqa_test.json")
    assert (
        table.kind == "vqa" and table.answers(0) == ("no", "no", "yes") and table.answers(1) == ()
    )
    assert table.texts(1) == ("Any answer?",) and _colour(table, 0)[0] == 9
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.png", "q": "?"}]))
    with pytest.raises(ValueError, match=r"bad.json \[0\] has no 'question'; it has: 'image', 'q'"):
        open_table(tmp_path / "bad.json", format="vqa")


class _Bytes(torch.utils.data.Dataset):
    def __init__(self, table):
        self.table = table

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return i, self.table.image_bytes(i), self.table.texts(i)


def test_webdataset_table_reads_right_in_dataloader_workers(tmp_path):
    # The parent reads first (its handles open), then two forked workers read interleaved
    # offsets of the same shard: each must get its own file position.
    _write_shard(
        tmp_path / "s.tar",
        [{"__key__": f"{k:04d}", "png": _encoded(k), "txt": str(k)} for k in range(64)],
    )
    table = open_table(tmp_path / "s.tar")
    expected = [table.image_bytes(i) for i in range(64)]
    loader = torch.utils.data.DataLoader(
        _Bytes(table), batch_size=None, shuffle=True, num_workers=2,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    seen = {i: (data, tuple(texts)) for i, data, texts in loader}  # collation makes lists
    assert sorted(seen) == list(range(64))
    assert all(seen[i] == (expected[i], (str(i),)) for i in range(64))
