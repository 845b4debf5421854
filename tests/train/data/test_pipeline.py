"""train.data.pipeline: exact mid-epoch resume with workers, disjoint and covering rank
shares, bad samples skipped in a fixed order and counted, the bad-fraction stop."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import WordTokenizer, WorldConfig, sample_scenes
from train.data.formats import open_table
from train.data.pipeline import Captions, LoaderSource, Samples, _Batches

WORLD = WorldConfig()
TOKENIZER = WordTokenizer.for_world(WORLD)


def write_csv(folder, n, *, seed=0, captions=None):
    """n shapes-world scenes as 40 px PNGs + train.csv (filepath,title); returns the csv."""
    scenes = sample_scenes(WORLD, n, generator=torch.Generator().manual_seed(seed))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pixels = (scenes.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).resize((40, 40)).save(folder / "images" / f"{i:03d}.png")
        caption = scenes.captions[i] if captions is None else captions(i, scenes.captions[i])
        rows.append({"filepath": f"images/{i:03d}.png", "title": caption})
    path = folder / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def samples_of(path, seed=0):
    table = open_table(path)
    return Samples(table, Captions(TOKENIZER, 16), size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                   seed=seed)  # fmt: skip


def draw(source, n):
    return [next(source) for _ in range(n)]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.fixture(scope="module")
def table_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("pairs"), 14)


def test_batches_have_the_family_fields(table_csv):
    batch = next(LoaderSource(samples_of(table_csv), batch_size=4, seed=0, workers=0))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["tokens"].shape == (4, 16) and batch["tokens"].dtype == torch.int64
    # normalised by mean 0.5 / std 0.25: pixels in [0, 1] land in [-2, 2]
    assert float(batch["images"].min()) >= -2.0 and float(batch["images"].max()) <= 2.0


def test_mid_epoch_resume_with_workers_equals_the_uninterrupted_run(table_csv):
    # 14 samples, batches of 4: 3 per epoch (2 samples dropped each epoch), so 8 batches
    # cross two epoch boundaries; the resume point (5) is mid-epoch.
    whole = draw(LoaderSource(samples_of(table_csv), batch_size=4, seed=3, workers=2), 8)
    first = LoaderSource(samples_of(table_csv), batch_size=4, seed=3, workers=2)
    head = draw(first, 5)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    assert {k: int(v) for k, v in state.items()} == {"epoch": 1, "batch": 2, "skipped": 0,
                                                    "tried": 20}  # fmt: skip
    resumed = LoaderSource(samples_of(table_csv), batch_size=4, seed=3, workers=2)
    resumed.load_state_dict(state)
    assert same(head + draw(resumed, 3), whole)
    # workers only change where the work is done: 0 workers give the same bits
    assert same(draw(LoaderSource(samples_of(table_csv), batch_size=4, seed=3, workers=0), 8),
                whole)  # fmt: skip
    # epochs differ (order and crops); another seed differs
    assert not torch.equal(whole[0]["images"], whole[3]["images"])
    other = next(LoaderSource(samples_of(table_csv), batch_size=4, seed=4, workers=0))
    assert not torch.equal(other["images"], whole[0]["images"])


def test_putting_back_one_batch_replays_it_and_seeking_rereads(table_csv):
    source = LoaderSource(samples_of(table_csv), batch_size=4, seed=0, workers=1)
    position = source.state_dict()
    checked = next(source)  # what the loop's first-batch check does
    source.load_state_dict(position)
    again = draw(source, 4)
    assert same([checked], again[:1])
    source.load_state_dict({**position, "batch": torch.tensor(1)})  # a seek: a fresh read
    assert same(draw(source, 3), again[1:])


def test_two_ranks_read_disjoint_covering_shares_of_every_global_batch(table_csv):
    one = draw(LoaderSource(samples_of(table_csv), batch_size=4, seed=1, workers=0), 6)
    ranks = [
        draw(
            LoaderSource(
                samples_of(table_csv), batch_size=4, seed=1, workers=0, rank=r, world_size=2
            ),
            6,
        )
        for r in (0, 1)
    ]
    for whole, r0, r1 in zip(one, *ranks, strict=True):
        assert r0["images"].shape[0] == r1["images"].shape[0] == 2
        for k in whole:  # the rows rows_of would give each rank of the global batch
            assert torch.equal(torch.cat([r0[k], r1[k]]), whole[k])
    # the keys: in each epoch the ranks' indices never meet, and together they are the
    # epoch's first n // B * B samples of the permutation, none twice
    n, b = 14, 4
    keys = [_Batches(n, b, 1, r, 2) for r in (0, 1)]
    seen = [[], []]
    for r, batches in enumerate(keys):
        for _, batch in zip(range(3), batches, strict=False):
            seen[r] += [i for epoch, i in batch if epoch == 0]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(keys[0].order(0)[: n // b * b].tolist())


def test_bad_samples_are_replaced_by_the_next_index_counted_and_named(tmp_path):
    path = write_csv(tmp_path, 12, captions=lambda i, c: "" if i == 4 else c)
    (tmp_path / "images" / "002.png").write_bytes(b"not a png")
    (tmp_path / "images" / "007.png").unlink()
    good = samples_of(path)
    assert good[(0, 3)][1] == []
    # index 2 (corrupt) -> 3; index 4 (empty caption) -> 5; index 7 (missing) -> 8
    for bad, used in ((2, 3), (4, 5), (7, 8)):
        fields, skipped = good[(0, bad)]
        assert len(skipped) == 1 and skipped[0][0].endswith(f"{bad:03d}.png")
        assert torch.equal(fields["tokens"], good.sample(0, used)["tokens"])
    source = LoaderSource(samples_of(path), batch_size=12, seed=0, workers=1)
    batch = next(source)
    assert batch["images"].shape[0] == 12  # never short
    report = source.report()
    assert report["skipped_samples"] == 3 and report["epochs"] == 1
    assert {w.split(" ")[0].rsplit("/", 1)[-1] for w in report["first_bad"]} == {
        "002.png", "004.png", "007.png"}  # fmt: skip
    assert int(source.state_dict()["tried"]) == 15
    # the counts resume with the position
    again = LoaderSource(samples_of(path), batch_size=12, seed=0, workers=0)
    again.load_state_dict(source.state_dict())
    assert again.report()["skipped_samples"] == 3


def test_past_max_bad_fraction_the_run_stops_naming_examples(tmp_path):
    path = write_csv(tmp_path, 8)
    (tmp_path / "images" / "005.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = LoaderSource(samples_of(path), batch_size=8, seed=0, workers=0, max_bad_fraction=0)
    with pytest.raises(ValueError, match=r"1 of the 9 samples .*--max-bad-fraction 0.*005\.png"):
        next(source)
    # under the limit the same data trains on: 1 bad of at least 1000 judged is 0.1%
    assert (
        next(LoaderSource(samples_of(path), batch_size=8, seed=0, workers=0))["images"].shape[0]
        == 8
    )


def test_nothing_readable_is_one_error(tmp_path):
    path = write_csv(tmp_path, 4)
    for png in (tmp_path / "images").iterdir():
        png.write_bytes(b"")
    with pytest.raises(ValueError, match="unreadable"):
        next(LoaderSource(samples_of(path), batch_size=4, seed=0, workers=0))


def test_a_batch_larger_than_the_table_is_refused(table_csv):
    with pytest.raises(ValueError, match="--batch-size 20 is more than its 14 samples"):
        LoaderSource(samples_of(table_csv), batch_size=20, seed=0, workers=0)


def test_image_ids_make_rows_sharing_an_image_one_example(tmp_path):
    """ALBEF's positives: a CSV with a caption per row names an image twice; both rows get
    the image's id, every other image another one."""
    path = write_csv(tmp_path, 4)
    rows = path.read_text().splitlines()
    path.write_text("\n".join([*rows, rows[1].replace(rows[1].split(",", 1)[1], "again")]))
    table = open_table(path)
    samples = Samples(table, Captions(TOKENIZER, 16), size=32, mean=(0.5,) * 3,
                      std=(0.25,) * 3, seed=0, image_ids=True)  # fmt: skip
    ids = [int(samples.sample(0, i)["idx"]) for i in range(len(table))]
    assert ids[4] == ids[0] and len(set(ids[:4])) == 4 and min(ids) >= 0
    assert "idx" not in samples_of(path).sample(0, 0)
