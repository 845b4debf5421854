"""``python -m train export-shapes DIR --format csv|folder|wds|hf --n N``: the shapes world
on disk, as a user's dataset would be.

::

    python -m train export-shapes data/shapes --format csv --n 20000
    python -m train clip --data data/shapes/train.csv --val-data data/shapes/val.csv \\
        --zeroshot-data data/shapes/heldout --out runs/shapes

writes ``N`` training scenes (:func:`train.data.shapes.sample_scenes`, rendered at
``--image-size``, default 64, so a 32 px model trains on random crops of them) in the
format asked, each a PNG and its caption:

- ``csv``: ``DIR/train.csv`` (``filepath,title``) + ``DIR/images/NNNNNN.png``
- ``folder``: ``DIR/train/NNNNNN.png`` + ``NNNNNN.txt`` (img2dataset's layout)
- ``wds``: ``DIR/shards/shard-000000.tar``, ... (1000 scenes a shard, webdataset's writer)
- ``hf``: ``DIR/train_hf/`` (``datasets``' ``save_to_disk``: ``image``, ``text``)

and always ``DIR/val.csv`` + ``DIR/val/`` (``--val-n`` more scenes, another seed: a
retrieval split) and ``DIR/heldout/<colour>_<shape>/NNNN.png``, an ImageFolder of the 48
colour x shape classes, ``--per-class`` images each, the held-out combinations that no
training scene shows included (zero-shot evaluation). ``DIR/export.json`` records the
settings. The same ``--seed`` gives the same scenes in every format.

``--format video-csv`` writes the moving-shapes clips (:mod:`train.data.video_shapes`,
``--frames`` frames at ``--image-size``) as real video files instead, lossless H.264 in
``.mp4`` (:func:`train.data.videos.write_video`): ``DIR/train.csv`` (``video,caption,label``,
the label the clip's motion) + ``DIR/clips/NNNNNN.mp4``, ``N`` training clips (no held-out
motion x shape pair among them), and ``DIR/val.csv`` + ``DIR/val/``: every motion x shape
pair ``--per-class`` times, held-out pairs included (a ``heldout`` column says which)::

    python -m train export-shapes data/clips --format video-csv --n 2000
    python -m train video-vqvae --data data/clips/train.csv --out runs/clips-vqvae

``--format audio-csv`` writes the sound world (:mod:`train.data.sounds`, ``--seconds`` a
clip) as WAV files + ``train.csv`` / ``val.csv`` (:mod:`train.recipes.export_sounds`).

Everything is written into ``DIR.partial`` and renamed to ``DIR`` at the end: a killed
export leaves no ``DIR`` that looks complete (the next export removes the ``.partial``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import itertools
import json
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fmm.io import atomic_write
from train.data.shapes import WorldConfig, class_names, eval_set, sample_scenes
from train.data.video_shapes import (
    VideoWorldConfig,
    clip_eval_set,
    is_holdout_motion,
    sample_clips,
)
from train.data.videos import write_video
from train.recipes import number, out_dir

FORMATS = ("csv", "folder", "wds", "hf")
VIDEO_FORMATS = ("video-csv",)
AUDIO_FORMATS = ("audio-csv",)  # the sound world: train.recipes.export_sounds
DATA_PATH = {"csv": "train.csv", "folder": "train", "wds": "shards", "hf": "train_hf"}
PER_SHARD = 1000
_HF_CHUNK = 10_000  # scenes per Arrow chunk of the hf export
_BATCH = 256  # scenes rendered at once (the scenes do not depend on it: one generator)
# Generator streams of the three parts, apart from the training scenes' seed.
_VAL_STREAM, _HELDOUT_STREAM = 2**40, 2**41


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=out_dir, metavar="DIR", help="the folder to write")
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS + VIDEO_FORMATS + AUDIO_FORMATS,
        help="training data layout",
    )
    parser.add_argument("--n", type=number(at_least=1), required=True, help="training scenes")
    parser.add_argument("--seed", type=number(at_least=0), default=0, help="(default 0)")
    parser.add_argument(
        "--image-size", type=number(at_least=16), default=64, help="pixels a side (default 64)"
    )
    parser.add_argument(
        "--per-class", type=number(at_least=1), default=20,
        help="held-out ImageFolder images per class; video-csv: val clips per motion x "
        "shape pair; audio-csv: val clips per class (default 20)",
    )  # fmt: skip
    parser.add_argument(
        "--frames", type=number(at_least=2), default=8, help="video-csv: frames a clip (default 8)"
    )
    parser.add_argument(
        "--seconds", type=number(float, at_least=0.25, at_most=60), default=2.0,
        help="audio-csv: seconds a clip (default 2)",
    )  # fmt: skip
    parser.add_argument(
        "--val-n", type=number(at_least=1), default=1000, help="retrieval scenes (default 1000)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")


def run(args: argparse.Namespace) -> None:
    if args.format in AUDIO_FORMATS:
        from train.recipes.export_sounds import export_sounds  # it imports this module

        data = export_sounds(
            args.dir, n=args.n, seed=args.seed, seconds=args.seconds, per_class=args.per_class,
            overwrite=args.overwrite,
        )  # fmt: skip
        print(f"wrote {args.n} training clips ({data}) and val clips ({args.dir / 'val.csv'})")
        return
    if args.format in VIDEO_FORMATS:
        data = export_clips(
            args.dir, n=args.n, seed=args.seed, image_size=args.image_size, frames=args.frames,
            per_pair=args.per_class, overwrite=args.overwrite,
        )  # fmt: skip
        print(
            f"wrote {args.n} training clips ({data}) and val clips ({args.dir / 'val.csv'}); "
            f"train on them with: python -m train video-vqvae --data {shlex.quote(str(data))} "
            f"--out runs/clips-vqvae"
        )
        return
    data = export(
        args.dir, format=args.format, n=args.n, seed=args.seed, image_size=args.image_size,
        per_class=args.per_class, val_n=args.val_n, overwrite=args.overwrite,
    )  # fmt: skip
    out = args.dir
    command = (
        f"python -m train clip --data {shlex.quote(str(data))} "
        f"--val-data {shlex.quote(str(out / 'val.csv'))} "
        f"--zeroshot-data {shlex.quote(str(out / 'heldout'))} --out runs/shapes-{args.format}"
    )
    print(
        f"wrote {args.n} training scenes ({args.format}: {data}), {args.val_n} retrieval "
        f"scenes ({out / 'val.csv'}) and {48 * args.per_class} held-out class images "
        f"({out / 'heldout'}); train on them with: {command}"
    )


def export(
    out: Path,
    *,
    format: str,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    per_class: int = 20,
    val_n: int = 1000,
    overwrite: bool = False,
) -> Path:
    """Write the export described in the module's docstring to ``out``; returns the path to
    pass as ``--data``. A non-empty ``out`` is refused (``SystemExit``) unless ``overwrite``."""
    if format not in FORMATS:
        raise ValueError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    world = WorldConfig(image_size=image_size)
    total = n + val_n + len(class_names(world)) * per_class
    with (
        written(out, overwrite=overwrite) as partial,
        tqdm(total=total, desc=f"export-shapes {format}", unit="image") as bar,
    ):
        _WRITERS[format](partial, _scenes(world, n, seed, bar))
        _write_csv(partial, "val", _scenes(world, val_n, seed + _VAL_STREAM, bar))
        _write_heldout(partial / "heldout", world, per_class, seed + _HELDOUT_STREAM, bar)
        settings = {
            "format": format, "data": DATA_PATH[format], "n": n, "seed": seed, "val_n": val_n,
            "per_class": per_class, "world": dataclasses.asdict(world),
        }  # fmt: skip
        _write_settings(partial, settings)
    return Path(out) / DATA_PATH[format]


@contextlib.contextmanager
def written(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """The ``DIR.partial`` folder to write an export into, renamed to ``out`` when the
    block ends without an error. A non-empty ``out`` is refused (``SystemExit``) unless
    ``overwrite``; a killed export's ``.partial`` is removed first."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"{out} is not empty: pass --overwrite to replace it")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def _write_settings(root: Path, settings: dict) -> None:
    atomic_write(root / "export.json", lambda p: Path(p).write_text(json.dumps(settings)))


def export_clips(
    out: Path,
    *,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    frames: int = 8,
    per_pair: int = 20,
    overwrite: bool = False,
) -> Path:
    """Write the ``video-csv`` export of the module's docstring to ``out``; returns the
    path to pass as ``--data`` (``out/train.csv``)."""
    world = VideoWorldConfig(image_size=image_size, frames=frames)
    val_n = len(world.motions) * len(world.shapes) * per_pair
    with (
        written(out, overwrite=overwrite) as partial,
        tqdm(total=n + val_n, desc="export-shapes video-csv", unit="clip") as bar,
    ):
        generator = torch.Generator().manual_seed(seed)
        batches = (
            sample_clips(world, min(_BATCH, n - start), generator=generator)
            for start in range(0, n, _BATCH)
        )
        _write_clips(partial, "train", world, batches, bar)
        held = clip_eval_set(world, per_pair, seed=seed + _VAL_STREAM)
        _write_clips(partial, "val", world, [held], bar)
        settings = {
            "format": "video-csv", "data": "train.csv", "n": n, "seed": seed,
            "per_pair": per_pair, "world": dataclasses.asdict(world),
        }  # fmt: skip
        _write_settings(partial, settings)
    return Path(out) / "train.csv"


def _write_clips(root: Path, name: str, world: VideoWorldConfig, batches, bar: tqdm) -> None:
    """``root/<name>.csv`` (``video,caption,label,heldout``) listing
    ``root/<clips|name>/NNNNNN.mp4``, from batches of :class:`~train.data.video_shapes.Clips`."""
    folder = "clips" if name == "train" else name
    (root / folder).mkdir()
    rows = []
    for clips in batches:
        pixels = (clips.videos * 255).round().clamp(0, 255).to(torch.uint8)
        held = is_holdout_motion(world, clips.motions, clips.shapes).tolist()
        for video, caption, motion, h in zip(pixels, clips.captions, clips.motions.tolist(), held):
            path = f"{folder}/{len(rows):06d}.mp4"
            write_video(root / path, video)
            rows.append((path, caption, world.motions[motion], int(h)))
            bar.update()
    _write_rows(root / f"{name}.csv", ("video", "caption", "label", "heldout"), rows)


def pngs(images: torch.Tensor) -> list[bytes]:
    """Images ``[batch, 3, H, W]`` in ``[0, 1]`` as PNG bytes each (rounded to 8 bits)."""
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _scenes(world: WorldConfig, n: int, seed: int, bar: tqdm) -> Iterator[tuple[bytes, str]]:
    """(PNG, caption) of ``n`` training-split scenes from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, _BATCH):
        scenes = sample_scenes(world, min(_BATCH, n - start), generator=generator)
        for data, caption in zip(pngs(scenes.images), scenes.captions):
            yield data, caption
            bar.update()


def _write_csv(root: Path, name: str, scenes) -> None:
    """``root/<name>.csv`` listing ``root/<name>/NNNNNN.png`` (csv: ``images``)."""
    folder = "images" if name == "train" else name
    (root / folder).mkdir()
    rows = []
    for i, (data, caption) in enumerate(scenes):
        (root / folder / f"{i:06d}.png").write_bytes(data)
        rows.append((f"{folder}/{i:06d}.png", caption))
    _write_rows(root / f"{name}.csv", ("filepath", "title"), rows)


def _write_rows(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    """A CSV file of ``header`` and ``rows``, written atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    atomic_write(path, write)


def _write_folder(root: Path, scenes) -> None:
    (root / "train").mkdir()
    for i, (data, caption) in enumerate(scenes):
        (root / "train" / f"{i:06d}.png").write_bytes(data)
        (root / "train" / f"{i:06d}.txt").write_text(caption + "\n", encoding="utf-8")


def _write_shards(root: Path, scenes) -> None:
    import webdataset  # the data extra; imported only for this format

    (root / "shards").mkdir()
    sink = None
    for i, (data, caption) in enumerate(scenes):
        if i % PER_SHARD == 0:
            if sink is not None:
                sink.close()
            sink = webdataset.TarWriter(str(root / "shards" / f"shard-{i // PER_SHARD:06d}.tar"))
        sink.write({"__key__": f"{i:06d}", "png": data, "txt": caption})
    sink.close()


def _write_hf(root: Path, scenes) -> None:
    import datasets  # the data extra; imported only for this format

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    # Chunks saved as they come, then joined memory-mapped: never every PNG in memory.
    chunks = []
    while chunk := list(itertools.islice(scenes, _HF_CHUNK)):
        rows = {
            "image": [{"bytes": d, "path": None} for d, _ in chunk],
            "text": [c for _, c in chunk],
        }
        chunks.append(root / f".hf-chunk-{len(chunks):05d}")
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(chunks[-1]))
    parts = [datasets.load_from_disk(str(c)) for c in chunks]
    datasets.concatenate_datasets(parts).save_to_disk(str(root / "train_hf"))
    del parts
    for chunk in chunks:
        shutil.rmtree(chunk)


def _write_heldout(root: Path, world: WorldConfig, per_class: int, seed: int, bar: tqdm) -> None:
    images, labels = eval_set(world, per_class, seed=seed)
    names = [name.replace(" ", "_") for name in class_names(world)]
    for name in names:
        (root / name).mkdir(parents=True)
    for i, (data, label) in enumerate(zip(pngs(images), labels.tolist())):
        (root / names[label] / f"{i % per_class:04d}.png").write_bytes(data)
        bar.update()


_WRITERS = {
    "csv": lambda root, scenes: _write_csv(root, "train", scenes),
    "folder": _write_folder,
    "wds": _write_shards,
    "hf": _write_hf,
}
