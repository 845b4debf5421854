"""train.data.formats for archives: webdataset shards (a file, a folder, a brace pattern;
keys, extensions, missing members, broken shards, forked DataLoader workers) and Hugging
Face datasets (save_to_disk, dataset dicts, parquet files), pickling small and the missing
optional package named with its extra."""

import io
import pickle
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.train.data.test_formats import colour_of, write_png
from train.data.formats import open_table, sniff


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
        assert colour_of(table, 11)[0] == 23
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
        table.texts(0) == ("upper-case jpg",)
        and table.texts(1) == ()
        and colour_of(table, 1)[0] < 10
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
    assert colour_of(table, 7)[0] == 7  # opens a handle
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
    assert [colour_of(table, i)[0] for i in range(3)] == [5, 6, 7]
    again = pickle.loads(pickle.dumps(table))
    assert again.image_bytes(1) == table.image_bytes(1)
    assert len(pickle.dumps(table)) < 50_000


def test_hf_columns_as_paths_and_caption_lists_in_a_dataset_dict(tmp_path, hf_cache):
    datasets = hf_cache
    write_png(tmp_path / "ds" / "pics" / "a.png", 33)
    split = datasets.Dataset.from_dict({"file": ["pics/a.png"], "captions": [["one", "two"]]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="has splits train, test: choose one with --split"):
        open_table(tmp_path / "ds", image_column="file", text_column="captions")
    table = open_table(tmp_path / "ds", image_column="file", text_column="captions", split="test")
    assert table.texts(0) == ("one", "two") and colour_of(table, 0)[0] == 33
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
        assert colour_of(table, 4)[0] == 11
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
