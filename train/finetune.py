"""Fine-tuning CLIP from converted weights, locking towers (LiT), and exporting a run back.

The flags (:func:`add_finetune_arguments`, on ``python -m train clip``):

- ``--init-from FILE --format open_clip|hf|torchmultimodal --vocab BPE_FILE``: start from
  a checkpoint a user already has (read by ``fmm.io.read_state_dict``, never unpickled),
  its config built from the file (a Hugging Face ``config.json`` beside it, an open_clip
  ``open_clip_config.json`` beside it, else the sizes read off the weights with OpenAI's
  quick GELU), its image size and mean/std (``preprocessor_config.json`` /
  ``open_clip_config.json`` beside it, else OpenAI's), CLIP's BPE from ``--vocab``: the
  ``bpe_simple_vocab_16e6.txt.gz`` that open_clip ships inside its package (and OpenAI's
  repository at ``clip/bpe_simple_vocab_16e6.txt.gz``). The run saves the tokenizer as
  ``tokenizer.json`` (merges included), so ``load_run`` and ``evaluate --run`` need no file.
- ``--lock-image`` / ``--lock-text``: freeze that tower (``Job.trainable``); the temperature
  trains unless both are locked, which is refused.
- ``--export open_clip|hf`` (repeatable): after the run, the trained weights in that layout:
  ``export/open_clip_model.safetensors`` with ``export/open_clip_config.json``
  (``open_clip.create_model("local-dir:RUN/export")``), or ``export/hf/`` with
  ``model.safetensors``, ``config.json`` and ``preprocessor_config.json``
  (``transformers.CLIPModel.from_pretrained("RUN/export/hf")``), each written atomically.

:func:`load_for_eval` is the one reader of converted weights, shared with
``python -m train evaluate --weights FILE --format ...``.

Example::

    python -m train clip --init-from clip-vit-base-patch32/model.safetensors --format hf \\
        --vocab bpe_simple_vocab_16e6.txt.gz --data photos.csv --lock-text --export hf
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file

import fmm
from fmm.convert import ConversionError
from fmm.io import atomic_write, fsync_dir, read_state_dict, umask, write_synced
from models import clip
from models.clip.convert import config_beside, config_from_open_clip, config_from_state_dict
from models.family import Family
from train.data import WorldConfig, sample_scenes
from train.data.tokenizers import CLIPRunTokenizer
from train.data.transforms import OPENAI_MEAN, OPENAI_STD
from train.loop import Evaluation, Job, SeededSource

FORMATS = ("open_clip", "hf", "torchmultimodal")
EXPORTS = ("open_clip", "hf")
EXPORT_DIR = "export"
OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG = "open_clip_model.safetensors", "open_clip_config.json"
HF_DIR, HF_PREPROCESSOR = "hf", "preprocessor_config.json"
VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
TOWERS = {"lock_image": "image.", "lock_text": "text."}
_SHOWN_KEYS = 6  # keys a mismatch line names before "... and N more"


class Pretrained(NamedTuple):
    """Converted weights ready to run: ``(family, cfg, params, tokenizer, transform)``;
    ``transform`` holds ``size``, ``mean`` and ``std``, the keywords of
    ``train.data.images.eval_transform`` / ``train_transform``."""

    family: Family
    cfg: Any
    params: Any
    tokenizer: CLIPRunTokenizer
    transform: dict


def vocab_hint() -> str:
    """Where a user finds CLIP's merges file (open_clip's copy, if it is installed)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")  # found, not imported
    where = [Path(p) / VOCAB_NAME for p in (spec.submodule_search_locations or [])] if spec else []
    here = next((str(p) for p in where if p.is_file()), None)
    shipped = f"open_clip ships it: {here}" if here else "open_clip ships it inside its package"
    return f"CLIP's BPE merges file {VOCAB_NAME} ({shipped}; also in OpenAI's CLIP repository)"


def _one_line(error: Exception, where: str) -> ValueError:
    """A converter's report (a headline, then one key a line) as one line naming ``where``."""
    head, *keys = [line.strip() for line in str(error).splitlines() if line.strip()]
    more = f"; ... and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return ValueError("; ".join([f"{where}: {head}", *keys[:_SHOWN_KEYS]]) + more)


def _beside(path: Path, name: str) -> dict | None:
    found = path.with_name(name)
    if not found.is_file():
        return None
    try:
        return json.loads(found.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{found}: unreadable ({e})") from None


def _weights_file(path: Path, fmt: str) -> Path:
    """A Hugging Face folder (``save_pretrained``'s) names its ``model.safetensors``."""
    if fmt == "hf" and path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
    return path


def _config_and_transform(sd: dict, path: Path, fmt: str) -> tuple[Any, dict]:
    mean, std = OPENAI_MEAN, OPENAI_STD
    if fmt == "hf" and path.with_name("config.json").is_file():
        cfg = config_beside(path.with_name("config.json"))
        pre = _beside(path, HF_PREPROCESSOR) or {}
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    elif fmt == "open_clip" and (spec := _beside(path, OPEN_CLIP_CONFIG)) is not None:
        try:
            cfg = config_from_open_clip(spec["model_cfg"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path.with_name(OPEN_CLIP_CONFIG)}: no model_cfg ({e})") from None
        pre = spec.get("preprocess_cfg") or {}
        mean, std = pre.get("mean", mean), pre.get("std", std)
    else:
        cfg = config_from_state_dict(sd, fmt)
    return cfg, {"size": cfg.image_size, "mean": tuple(mean), "std": tuple(std)}


def load_for_eval(
    weights: str | os.PathLike, fmt: str, vocab: str | os.PathLike | None, *, flag="--weights"
) -> Pretrained:
    """CLIP ``(family, cfg, params, tokenizer, transform)`` from a converted checkpoint.

    ``weights``: a ``.safetensors`` / ``.bin`` / ``.pt`` file (or a Hugging Face
    ``save_pretrained`` folder); ``fmt``: one of :data:`FORMATS`; ``vocab``: CLIP's merges
    file. A wrong format, a file missing keys or a vocabulary of another size is one
    ``ValueError`` line naming ``flag``, the file and the keys. Example::

        family, cfg, params, tok, transform = load_for_eval("ViT-B-32.pt", "open_clip", VOCAB)
        images = torch.stack([eval_transform(im, **transform) for im in photos])
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if vocab is None:
        raise ValueError(f"{flag} needs --vocab: {vocab_hint()}")
    path = _weights_file(Path(weights), fmt)
    where = f"{flag} {path} (--format {fmt})"
    try:
        sd = read_state_dict(path)
        cfg, transform = _config_and_transform(sd, path, fmt)
        params = clip.FAMILY.converters[fmt].from_(sd, cfg)
    except FileNotFoundError as e:
        raise ValueError(f"{flag}: {e}") from None
    except ConversionError as e:
        raise _one_line(e, where) from None
    try:
        tokenizer = CLIPRunTokenizer.from_vocab(vocab)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"--vocab {vocab}: {e}; pass {vocab_hint()}") from None
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"--vocab {vocab} has {tokenizer.vocab_size} ids but {path} embeds "
            f"{cfg.vocab_size}: pass the checkpoint's own vocabulary ({VOCAB_NAME})"
        )
    return Pretrained(clip.FAMILY, cfg, params, tokenizer, transform)


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """``--init-from``, ``--format``, ``--vocab``, ``--lock-image``, ``--lock-text``,
    ``--export`` (see the module docstring)."""
    add = parser.add_argument
    add("--init-from", type=Path, default=None, metavar="FILE",
        help="start from these converted weights (.safetensors/.bin/.pt, with --format and "
        "--vocab) instead of clip_tiny from scratch")  # fmt: skip
    add("--format", choices=FORMATS, default=None, help="the layout of --init-from")
    add("--vocab", type=Path, default=None, metavar="BPE_FILE",
        help=f"CLIP's BPE merges for --init-from ({VOCAB_NAME}; open_clip ships it)")  # fmt: skip
    add("--lock-image", action="store_true", help="freeze the image tower (LiT)")
    add("--lock-text", action="store_true", help="freeze the text tower")
    add("--export", choices=EXPORTS, action="append", default=None,
        help="also write the trained weights in this layout under RUN/export/ (repeatable)")  # fmt: skip


def trainable_for(args: argparse.Namespace) -> Callable[[str], bool] | None:
    """``Job.trainable`` of the lock flags (``None`` when nothing is locked)."""
    locked = tuple(prefix for flag, prefix in TOWERS.items() if getattr(args, flag))
    if len(locked) == len(TOWERS):
        raise ValueError("--lock-image with --lock-text leaves only the temperature: drop one")
    return (lambda name: not name.startswith(locked)) if locked else None


def pretrained_from(args: argparse.Namespace) -> Pretrained | None:
    """``--init-from``'s weights (``None`` without it); flags that need it are refused."""
    if args.init_from is None:
        given = [f for f in ("format", "vocab", "lock_image", "lock_text") if getattr(args, f)]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} goes with --init-from FILE")
        return None
    if args.format is None:
        raise ValueError(f"--init-from {args.init_from} needs --format ({'|'.join(FORMATS)})")
    return load_for_eval(args.init_from, args.format, args.vocab, flag="--init-from")


def _scene_inputs(images: torch.Tensor, transform: dict) -> torch.Tensor:
    """Shapes-world pixels ``[B, 3, h, w]`` in ``[0, 1]`` as the checkpoint sees images:
    resized to its size (bicubic, as its eval transform) and standardised by its mean/std."""
    size = transform["size"]
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic")
    mean = torch.tensor(transform["mean"], dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(transform["std"], dtype=images.dtype).view(1, 3, 1, 1)
    return (images.clamp(0, 1) - mean.to(images.device)) / std.to(images.device)


def _scenes(world, tokenizer, context, transform, generator, batch_size) -> dict:
    scenes = sample_scenes(world, batch_size, generator=generator)
    return {
        "images": _scene_inputs(scenes.images, transform),
        "tokens": tokenizer.encode(scenes.captions, context),
    }


def finetune_job(args: argparse.Namespace, pretrained: Pretrained, table=None) -> Job:
    """The clip recipe's job from ``pretrained``: on ``table`` (``--data``, through the
    loader with the checkpoint's image size and mean/std) or the shapes world, starting from
    its params, with the lock flags' ``trainable`` and its tokenizer saved in the run.
    ``Job.context`` is ``(world, tokenizer, scene_inputs)`` as the recipe's evaluation reads it."""
    cfg, tokenizer, transform = pretrained.cfg, pretrained.tokenizer, pretrained.transform
    for fmt in args.export or ():
        check_export(fmt, cfg)
    world = WorldConfig()
    if table is not None:
        from train.data.flags import loader_source
        from train.data.pipeline import Captions, Samples

        text = Captions(tokenizer, cfg.context_length)
        samples = Samples(table, text, seed=args.seed, **transform)
        source, on = loader_source(args, samples), f"{args.data} ({len(table):,} samples)"
    else:
        draw = partial(_scenes, world, tokenizer, cfg.context_length, transform)
        source = SeededSource(draw, batch_size=args.batch_size, seed=args.seed)
        on = "the shapes world"
    locked = [flag.replace("_", "-") for flag in TOWERS if getattr(args, flag)]
    return Job(
        cfg=cfg,
        source=source,
        config={
            "init_from": {"file": str(args.init_from), "format": args.format},
            "data": None if table is None else str(args.data),
            "image_mean": list(transform["mean"]),
            "image_std": list(transform["std"]),
        },
        files={"tokenizer.json": tokenizer.to_json()},
        describe=f"clip from {args.init_from} ({args.format}) on {on}"
        + (f", {' '.join('--' + f for f in locked)}" if locked else ""),
        context=(world, tokenizer, partial(_scene_inputs, transform=transform)),
        init_params=pretrained.params,
        trainable=trainable_for(args),
    )


def check_export(fmt: str, cfg: Any) -> None:
    """Refuse, before training, a model the ``fmt`` layout cannot hold (one line)."""
    if fmt == "open_clip":
        try:
            clip.convert.config_to_open_clip(cfg)
        except ValueError as e:
            raise ValueError(f"--export open_clip: {e}") from None


def _replace_dir(staged: Path, final: Path) -> None:
    """Move the finished ``staged`` folder over ``final`` (an older export moves aside first)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _json(value: dict) -> Callable[[str], None]:
    return lambda path: Path(path).write_text(json.dumps(value, indent=2) + "\n")


def _safetensors(sd: dict) -> Callable[[str], None]:
    flat = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    return lambda path: save_file(flat, path, metadata={"format": "pt"})


def write_export(out: Path, params: Any, cfg: Any, fmt: str, transform: dict | None) -> Path:
    """Write ``params`` in the ``fmt`` layout under ``out`` (the run's ``export/``); returns
    what was written. ``transform`` (``size``/``mean``/``std``): the preprocessing recorded
    beside the weights (OpenAI's mean/std when ``None``)."""
    mean = list(transform["mean"]) if transform else list(OPENAI_MEAN)
    std = list(transform["std"]) if transform else list(OPENAI_STD)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "open_clip":
        spec = {
            "model_cfg": clip.convert.config_to_open_clip(cfg),
            "preprocess_cfg": {"mean": mean, "std": std},
        }
        atomic_write(out / OPEN_CLIP_WEIGHTS, _safetensors(clip.to_open_clip(params, cfg)))
        atomic_write(out / OPEN_CLIP_CONFIG, _json(spec))
        return out / OPEN_CLIP_WEIGHTS
    size = cfg.image_size
    pre = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean,
        "image_std": std, "do_convert_rgb": True,
    }  # fmt: skip
    staged = Path(tempfile.mkdtemp(prefix=f".{HF_DIR}.", dir=out))
    try:
        write_synced(staged / "model.safetensors", _safetensors(clip.to_hf(params, cfg)))
        write_synced(staged / "config.json", _json(clip.convert.config_to_hf(cfg)))
        write_synced(staged / HF_PREPROCESSOR, _json(pre))
        os.chmod(staged, 0o777 & ~umask())  # mkdtemp makes it 0700
        _replace_dir(staged, out / HF_DIR)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out / HF_DIR


def _transform_of(job: Job) -> dict | None:
    if "image_mean" not in job.config:
        return None
    return {"size": job.cfg.image_size, "mean": job.config["image_mean"],
            "std": job.config["image_std"]}  # fmt: skip


def with_export(evaluate: Callable[..., Evaluation]) -> Callable[..., Evaluation]:
    """A recipe's ``evaluate`` whose :class:`~train.loop.Evaluation` also writes the
    ``--export`` layouts into ``RUN/export/`` after the run is saved."""

    def evaluated(job: Job, params, model_state, args: argparse.Namespace, device):
        evaluation = evaluate(job, params, model_state, args, device)
        formats = args.export or ()
        if not formats:
            return evaluation
        weights = fmm.tree.map(lambda x: x.detach().cpu(), params)

        def write(folder: Path) -> None:
            for fmt in formats:
                write_export(folder, weights, job.cfg, fmt, _transform_of(job))

        return replace(evaluation, plots={**evaluation.plots, EXPORT_DIR: write})

    return evaluated
