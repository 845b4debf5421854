"""Samples per second of the training data pipeline (``train.data.pipeline.LoaderSource``)
against a plain loop and against the ``webdataset`` library's own pipeline, and the share of
a ``clip_tiny`` step spent waiting for data.

Two datasets, written to a temporary folder as webdataset shards (``webdataset.TarWriter``,
4 shards) and read from those same shards by every row:

- ``photos``: ``--photos`` synthetic photo-like JPEGs (gradients, blobs and noise, about
  640 x 480, quality 90) cropped to 224 px;
- ``shapes``: ``--scenes`` shapes-world scenes rendered at 64 px (PNG) cropped to 32 px.

Rows, each with ``--workers`` loader processes where it has any:

- ``plain loop`` (**baseline**): sample after sample in this process, the pipeline's own
  per-sample work (read by index, decode, random resized crop, normalise, tokenize) and no
  ``DataLoader``;
- ``LoaderSource, N workers``: fmm's source (shuffled, per-rank batch sampler, persistent
  workers, prefetch) over the indexed shard table;
- ``webdataset, N workers``: ``wds.WebDataset(shards).decode("pil").to_tuple(...)`` with the
  same crop, normalisation and tokenizer, in a ``DataLoader`` with the same workers (it
  streams shards front to back, unshuffled: the cheapest way webdataset reads them).

``ratio`` = the row's samples/s over the baseline's. fmm decodes JPEGs with PIL's draft
mode (a 1/2..1/8-scale DCT decode when the crop is that much smaller: ``decode(draft=)``);
webdataset's ``"pil"`` decoder decodes the full image, as its pipelines do unless told
otherwise. Times exclude starting the workers (the first batch). Then
``data_wait_fraction``: ``python -m train clip --data <shards>`` with the default flags
(batch 128, ``--workers`` default) for ``--steps`` steps, on each dataset, as the loop's
clock reports it (goal: <= 5%).

Run from the repo root::

    python benchmarks/data.py                # ~2 minutes on 2 cores
    python benchmarks/data.py --quick        # seconds; for tests
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.__main__ import main as train_main
from train.data import WorldConfig, sample_scenes
from train.data.formats import open_table
from train.data.images import train_transform
from train.data.pipeline import Captions, LoaderSource, Samples, default_workers
from train.data.tokenizers import BPETokenizer

MEAN, STD = (0.5,) * 3, (0.25,) * 3
SHARDS = 4
CONTEXT = 32


def photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A photo-like JPEG: a smooth colour gradient, soft blobs and sensor-like noise (so
    the entropy coder has a realistic amount of detail to decode)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, (3, 1, 1)) + rng.uniform(-1, 1, (3, 1, 1)) * (x / width) * 120
    base = base + rng.uniform(-1, 1, (3, 1, 1)) * (y / height) * 120
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 160)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        base = base + rng.uniform(-120, 120, (3, 1, 1)) * blob
    base = base + rng.normal(0, 12, (3, height, width))
    pixels = np.clip(base, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shards(folder: Path, images: list[bytes], captions: list[str], ext: str) -> str:
    """``images`` + ``captions`` as SHARDS webdataset shards; returns the brace pattern."""
    import webdataset as wds

    folder.mkdir(parents=True)
    per = math.ceil(len(images) / SHARDS)
    for s in range(SHARDS):
        with wds.TarWriter(str(folder / f"{s:06d}.tar")) as sink:
            for i in range(s * per, min(len(images), (s + 1) * per)):
                sink.write({"__key__": f"{i:06d}", ext: images[i], "txt": captions[i]})
    return str(folder / f"{{000000..{SHARDS - 1:06d}}}.tar")


def photos_data(folder: Path, n: int, size: tuple[int, int]) -> tuple[str, list[str]]:
    rng = np.random.default_rng(0)
    words = ("dog", "cat", "tree", "car", "beach", "street", "sofa", "mountain", "river", "cake")
    captions = [f"a photo of a {words[i % 10]} near a {words[(i * 7) % 10]}" for i in range(n)]
    jitter = lambda: (size[0] + int(rng.integers(-40, 41)), size[1] + int(rng.integers(-30, 31)))
    images = [photo(rng, *jitter()) for _ in range(n)]
    return write_shards(folder / "photos", images, captions, "jpg"), captions


def shapes_data(folder: Path, n: int) -> tuple[str, list[str]]:
    scenes = sample_scenes(
        WorldConfig(image_size=64), n, generator=torch.Generator().manual_seed(0)
    )
    images = []
    for i in range(n):
        pixels = (scenes.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        images.append(out.getvalue())
    return write_shards(folder / "shapes", images, list(scenes.captions), "png"), scenes.captions


def plain_loop(samples: Samples, n: int) -> float:
    for i in range(min(n, 32)):  # warm: the shards' index and page cache, as in the others
        samples.sample(0, i)
    start = time.perf_counter()
    for i in range(n):
        samples.sample(0, i)
    return n / (time.perf_counter() - start)


def loader_rate(samples: Samples, batch: int, workers: int, batches: int) -> float:
    source = LoaderSource(samples, batch_size=batch, seed=0, workers=workers)
    next(source)  # the workers start and fill their prefetch
    start = time.perf_counter()
    for _ in range(batches):
        next(source)
    rate = batches * batch / (time.perf_counter() - start)
    del source
    return rate


class _WdsTransform:
    """The same crop, normalisation and tokenizer on webdataset's ``(image, caption)``."""

    def __init__(self, tokenizer, size: int):
        self.tokenizer, self.size, self.count = tokenizer, size, 0

    def __call__(self, sample):
        image, caption = sample
        self.count += 1
        g = torch.Generator().manual_seed(self.count)
        pixels = train_transform(image.convert("RGB"), size=self.size, mean=MEAN, std=STD,
                                 generator=g)  # fmt: skip
        return pixels, self.tokenizer.encode([caption], CONTEXT)[0]


def webdataset_rate(pattern: str, ext: str, tokenizer, size: int, batch: int, workers: int):
    import webdataset as wds

    dataset = (
        wds.WebDataset(pattern, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple(ext, "txt")
        .map(_WdsTransform(tokenizer, size))
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    it = iter(loader)
    next(it)
    start, seen = time.perf_counter(), 0
    for images, _ in it:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def data_wait(pattern: str, folder: Path, steps: int, quick: bool) -> float:
    out = folder / "run"
    extra = ["--batch-size", "8", "--eval-per-class", "1"] if quick else ["--eval-per-class", "1"]
    train_main(["clip", "--data", pattern, "--steps", str(steps), "--out", str(out),
                "--overwrite", *extra])  # fmt: skip
    return json.loads((out / "metrics.json").read_text())["data_wait_fraction"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=500)
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40, help="clip steps for the data wait")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.photos, args.scenes, args.batch_size, args.workers, args.steps = 16, 32, 8, [0, 1], 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"default --workers {default_workers()}")  # fmt: skip
    photo_size = (160, 120) if args.quick else (640, 480)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datasets = {
            "photos": (*photos_data(tmp, args.photos, photo_size), "jpg", 64 if args.quick else 224),
            "shapes": (*shapes_data(tmp, args.scenes), "png", 32),
        }  # fmt: skip
        waits = {}
        for name, (pattern, captions, ext, size) in datasets.items():
            tokenizer = BPETokenizer.train(captions, vocab_size=1024)
            table = open_table(pattern)
            samples = Samples(table, Captions(tokenizer, CONTEXT), size=size, mean=MEAN, std=STD,
                              seed=0)  # fmt: skip
            n, b = len(table), args.batch_size
            batches = n // b - 1
            base = plain_loop(samples, n)
            print(f"\n{name}: {n} samples ({ext}) -> {size} px crops, batch {b}")
            print(f"{'row':<28}{'samples/s':>12}{'ratio':>8}")
            print(f"{'plain loop (baseline)':<28}{base:>12.1f}{1.0:>8.2f}")
            for w in args.workers:
                rate = loader_rate(samples, b, w, batches)
                print(f"{f'LoaderSource, {w} workers':<28}{rate:>12.1f}{rate / base:>8.2f}")
            for w in args.workers:
                rate = webdataset_rate(pattern, ext, tokenizer, size, b, w)
                print(f"{f'webdataset, {w} workers':<28}{rate:>12.1f}{rate / base:>8.2f}")
            waits[name] = data_wait(pattern, tmp, args.steps, args.quick)
        print()
        for name, share in waits.items():
            print(f"clip_tiny --data {name} ({args.steps} steps, default flags): "
                  f"data_wait_fraction {share:.4f} (goal <= 0.05)")  # fmt: skip


if __name__ == "__main__":
    main()
