"""One training loop for every recipe: validate, build, train, evaluate, save.

:func:`run` takes a :class:`Recipe` (a family, its defaults, how to build a :class:`Job`
from the flags, and how to evaluate) and the parsed flags, and:

1. checks everything a user can get wrong before any directory exists: the launch
   (``torchrun`` without ``--dist`` is refused: every process would train alone into one
   ``--out``), ``--out`` (an existing run needs ``--overwrite`` or ``--resume``), the
   checkpoint to resume, ``--log tensorboard``, the recipe's own inputs, and the first batch
   against the family's declared fields (``models.family.check_batch``);
2. trains with the pure step (one process, ``--compile``-able) or through the adapter
   (``--dist ddp|fsdp``, ``--ac``, ``--precision bf16-mixed``; one process or many), with a
   checkpoint of the whole train state (params, optimizer, step, keys, the family's train
   state, the data position, the metric history) every ``--checkpoint-every`` steps and at
   the end, and exact resume;
3. evaluates on rank 0 and saves the run as one unit (``train.checkpoint.save``):
   ``params.safetensors``, ``config.json``, ``run.json`` (the resolved flags, which
   ``--config`` replays), ``metrics.json``, ``metrics.jsonl``, the family's train state as
   ``model_state.safetensors`` if it has one, the recipe's files, then ``loss.png`` and the
   recipe's plots, and prints a "wrote" line naming every file in the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import fmm
from models.family import Family, check_batch
from train import checkpoint
from train import distributed as dist_
from train.loop import records
from train.loop.engine import ModuleTrainer, PureTrainer, Training, base_keys, optimizer_for
from train.loop.flags import RUN_FILE, Defaults, add_train_arguments, resolved
from train.loop.load import MODEL_STATE_FILE
from train.loop.source import BatchSource, rows_of, to_device
from train.plots import plot_loss
from train.recipes import device_of

CHECKPOINTS = "checkpoints"
LOSS_PLOT = "loss.png"
TAIL = 50  # steps averaged for mean_last_50_steps
# What makes a folder a run (so --overwrite may replace it).
_RUN_MARKERS = (
    checkpoint.MANIFEST_FILE,
    checkpoint.CONFIG_FILE,
    RUN_FILE,
    CHECKPOINTS,
    records.METRICS_LOG,
)


@dataclass
class Job:
    """What a recipe builds from the flags: the model config, the data, and what the run
    saves beside the params.

    ``source``: global batches (:mod:`train.loop.source`); ``batch_options``: keywords of
    ``family.batch(cfg, ...)``; ``config``: entries of ``config.json`` beside the model's
    own (the world, the task); ``files``: more files of the run (``tokenizer.json``);
    ``curves``: the step metrics ``loss.png`` shows; ``decay_mask``: AdamW's (default: decay
    leaves with ``ndim >= 2``); ``describe``: the model part of the header line; ``context``:
    whatever the recipe's evaluation needs (tokenizer, world).

    Fine-tuning and evaluation while training: ``init_params`` starts from these params
    (converted weights) instead of ``family.init``; ``trainable(dotted_path) -> bool`` marks
    the leaves that train (the others are frozen: no gradient, no update, no decay; default:
    all train); ``periodic(params, model_state) -> {name: float}`` runs on rank 0 every
    ``--eval-every`` steps, its figures joining that step's line of ``metrics.jsonl``.
    """

    cfg: Any
    source: BatchSource
    config: dict = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    batch_options: dict = field(default_factory=dict)
    curves: tuple[str, ...] = ("loss",)
    decay_mask: Callable[[str], bool] | None = None
    describe: str = ""
    context: Any = None
    init_params: Any = None
    trainable: Callable[[str], bool] | None = None
    periodic: Callable[[Any, Any], dict] | None = None


@dataclass
class Evaluation:
    """A recipe's verdict on the trained params: ``metrics`` (into ``metrics.json``),
    ``headline`` (the keys printed as JSON), ``title`` (of ``loss.png``), ``plots``
    (``{file name: write(path)}``)."""

    metrics: dict
    headline: tuple[str, ...]
    title: str = ""
    plots: dict[str, Callable[[Path], None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A training recipe as configuration: a family, defaults, and two functions.

    ``prepare(args, device) -> Job`` builds the config and the data (reading any run a flag
    names, so a wrong one fails before a directory is made); ``evaluate(job, params,
    model_state, args, device) -> Evaluation`` scores the trained params. ``add_arguments``
    adds the recipe's own flags; ``resolve(args)`` fills defaults that depend on other
    flags.
    """

    name: str
    help: str
    family: Family
    defaults: Defaults
    prepare: Callable[[argparse.Namespace, torch.device], Job]
    evaluate: Callable[..., Evaluation]
    extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    resolve: Callable[[argparse.Namespace], None] | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The shared flags with this recipe's defaults, then its own."""
        add_train_arguments(parser, self.defaults, name=self.name)
        if self.extra_arguments is not None:
            self.extra_arguments(parser)

    def run(self, args: argparse.Namespace) -> dict:
        """Train, evaluate and save (see :func:`run`)."""
        return run(self, args)


def _launch(args: argparse.Namespace) -> dist_.Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dist is None and world > 1:
        raise SystemExit(
            f"launched as {world} processes (torchrun) without --dist: each would train alone "
            "and write the same --out; pass --dist ddp or --dist fsdp"
        )
    if args.dist is None:
        return dist_.Env(0, 1, device_of(args))
    if args.out is None:
        raise SystemExit("--out is required with --dist (every rank must agree on it)")
    device_of(args)  # a bad --device is refused before joining
    try:
        return dist_.setup(args.device)
    except RuntimeError as e:
        raise SystemExit(str(e)) from e


def check_out(args: argparse.Namespace, name: str) -> Path:
    """``--out`` (or ``runs/<name>-<time>``), refused when it holds a run this one would
    silently overwrite; nothing is created here."""
    out = args.out or Path("runs") / time.strftime(f"{name}-%Y%m%d-%H%M%S")
    if args.resume and args.overwrite:
        raise SystemExit(
            "--resume continues the run in --out and --overwrite replaces it: pick one"
        )
    if args.resume:
        if args.out is None:
            raise SystemExit("--resume needs --out: the run to continue")
        try:
            found = checkpoint.latest_step(out / CHECKPOINTS)
        except checkpoint.CheckpointError as e:
            raise SystemExit(f"--resume: {e}") from e
        if found is None:
            raise SystemExit(
                f"--resume: no completed checkpoint in {out / CHECKPOINTS} "
                "(train with --checkpoint-every N first)"
            )
        if found >= args.steps:
            raise SystemExit(f"--resume: {out} is at step {found} already; pass --steps > {found}")
        return out
    if out.is_dir() and any(out.iterdir()):
        if not any((out / marker).exists() for marker in _RUN_MARKERS):
            raise SystemExit(
                f"--out {out} holds files that are not a run: use a new or empty folder"
            )
        if not args.overwrite:
            raise SystemExit(
                f"--out {out} holds a run already: pass --overwrite to replace it, --resume to "
                "continue it, or another --out"
            )
    return out


def _modular(args: argparse.Namespace) -> bool:
    """Whether the run goes through the adapter (the module path) rather than the pure step."""
    return bool(args.dist or args.ac or args.precision != "fp32")


def _check(args: argparse.Namespace, recipe: Recipe, env: dist_.Env) -> tuple[Path, bool]:
    """``(out, compiled)``, after the checks that need no work done."""
    out = check_out(args, recipe.name)
    if args.batch_size % env.world_size:
        raise SystemExit(
            f"--batch-size {args.batch_size} does not split evenly over {env.world_size} ranks: "
            f"pass a multiple of {env.world_size}"
        )
    if args.log == "tensorboard" and not records.tensorboard_available():
        raise SystemExit("--log tensorboard needs the tensorboard package: pip install tensorboard")
    modular = _modular(args)
    if modular and args.compile:
        raise SystemExit(
            "--compile is for the single-process pure step; drop it with --dist, --ac or "
            "--precision bf16-mixed"
        )
    compiled = (env.device.type == "cuda" if args.compile is None else args.compile) and not modular
    return out, compiled


def _first_batch(job: Job, fields: dict, recipe: Recipe) -> None:
    # Draw one batch to check, then put the source back: step 1 draws it again.
    position = job.source.state_dict()
    batch = next(job.source)
    job.source.load_state_dict(position)
    try:
        check_batch(fields, batch, where=f"python -m train {recipe.name}: the data")
    except TypeError as e:  # the data is the user's: a bad one is a user error (one line)
        raise ValueError(str(e)) from e


def _prepare_dir(out: Path, args: argparse.Namespace, env: dist_.Env, run_flags: dict) -> None:
    if env.is_main and not args.resume:
        if args.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        checkpoint.write_json(out / RUN_FILE, run_flags)
    if env.world_size > 1:
        torch.distributed.barrier()


def _tail_means(history: list[dict]) -> dict:
    tail = history[-TAIL:]
    names = [k for k in tail[-1] if k != "step"] if tail else []
    # A periodic figure (--eval-every) is on some lines only: its mean is over those.
    values = {k: [r[k] for r in tail if k in r] for k in names}
    return {k: round(sum(v) / len(v), 6) for k, v in values.items()}


def run(recipe: Recipe, args: argparse.Namespace) -> dict:
    """Run ``recipe`` with ``args``; returns the metrics written to ``metrics.json`` (``{}``
    on ranks other than 0)."""
    if recipe.resolve is not None:
        recipe.resolve(args)
    env = _launch(args)
    try:
        return _run(recipe, args, env)
    finally:
        if args.dist:
            dist_.teardown()


def _run(recipe: Recipe, args: argparse.Namespace, env: dist_.Env) -> dict:
    out, compiled = _check(args, recipe, env)
    family, device = recipe.family, env.device
    job = recipe.prepare(args, device)
    fields = family.batch(job.cfg, **job.batch_options)
    _first_batch(job, fields, recipe)
    keys = base_keys(args.seed)
    initial = job.init_params if job.init_params is not None else family.init(job.cfg, keys["init"])
    params = fmm.tree.map(lambda x: x.to(device), initial)
    model_state = None
    if family.init_state is not None:
        model_state = family.init_state(job.cfg, params, keys["state"].to(device))
    optimizer = optimizer_for(
        lr=args.lr,
        steps=args.steps,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        decay_mask=job.decay_mask,
    )
    what = Training(
        family, job.cfg, params, model_state, optimizer, keys["step"], trainable=job.trainable
    )
    if _modular(args):
        trainer = ModuleTrainer(what, env=env, mode=args.dist, ac=args.ac, precision=args.precision)
    else:
        trainer = PureTrainer(what, compile=compiled)
    start, history = 0, []
    if args.resume:
        saved = {**trainer.checkpoint_tree(), "data": job.source.state_dict()}
        try:
            start, extra = checkpoint.load_sharded(out / CHECKPOINTS, saved)
        except checkpoint.CheckpointError as e:
            raise SystemExit(f"--resume: {e}") from e
        job.source.load_state_dict(saved["data"])
        history = list(extra.get("history", []))[:start]
    _prepare_dir(out, args, env, resolved(args, recipe=recipe.name))
    if env.is_main:
        how = f"dist={args.dist or 'none'} x{env.world_size} ac={'on' if args.ac else 'off'} "
        how += f"precision={args.precision} compile={'on' if compiled else 'off'}"
        print(
            f"{job.describe or family.name}: {fmm.tree.count(params):,} params | "
            f"{args.steps} steps x {args.batch_size} | {device} | {how} | out={out}"
        )
        if start:
            print(f"resumed from {out / CHECKPOINTS} at step {start}")
        if compiled:
            print(
                "compiling the train step on the first batch (a minute or more on CPU; timed "
                "apart as first_step_seconds)"
            )
    timing = _train(trainer, job, fields, args, env, out, history, start, recipe.name)
    params, model_state = trainer.params(), trainer.model_state()
    if not env.is_main:
        return {}
    training = {"resumed_from": start, **timing, "compiled": compiled}
    return _finish(recipe, job, args, env, out, params, model_state, history, training)


def _train(trainer, job, fields, args, env, out, history, start, name) -> dict:
    """Steps ``start .. --steps``, appending to ``history``; returns the clock's report."""
    log = None
    if env.is_main:
        log = records.MetricsLog(out, history, tensorboard=args.log == "tensorboard")
    clock = records.Clock()
    every = args.checkpoint_every
    try:
        with records.progress(name, start, args.steps, show=env.is_main) as bar:
            for i in bar:
                waited = time.perf_counter()
                batch = next(job.source)
                if not getattr(job.source, "per_rank", False):  # else: the rank's rows already
                    batch = rows_of(batch, fields, rank=env.rank, world_size=env.world_size)
                batch = to_device(batch, env.device)
                clock.data(time.perf_counter() - waited)
                began = time.perf_counter()
                metrics = trainer.step(batch)
                record = {"step": i + 1, **records.scalars(metrics)}  # syncs: the step is done
                clock.step(time.perf_counter() - began)
                if job.periodic is not None and args.eval_every and (i + 1) % args.eval_every == 0:
                    record.update(_periodic(trainer, job, env))
                    bar.write(
                        f"step {i + 1}: "
                        + json.dumps({k: v for k, v in record.items() if k != "step"})
                    )
                history.append(record)
                if log is not None:
                    log.append(record)
                if every and ((i + 1) % every == 0 or i == args.steps - 1):
                    state = {**trainer.checkpoint_tree(), "data": job.source.state_dict()}
                    extra = {"history": history}
                    checkpoint.save_sharded(out / CHECKPOINTS, i + 1, state, extra=extra)
                if i % 10 == 0 or i == args.steps - 1:
                    data = getattr(job.source, "report", dict)()
                    records.show(bar, record, clock, batch_size=args.batch_size, data=data)
    finally:
        if log is not None:
            log.close()
    return clock.report(args.batch_size)


def _periodic(trainer, job: Job, env: dist_.Env) -> dict:
    """``job.periodic``'s figures on the current params (gathered on every rank under FSDP,
    scored on rank 0, in eval mode)."""
    params, model_state = trainer.params(), trainer.model_state()
    if not env.is_main:
        return {}
    with torch.no_grad():
        return {k: float(v) for k, v in job.periodic(params, model_state).items()}


def _listing(out: Path) -> list[str]:
    """The run's files and folders (``checkpoints/``), as the "wrote" line names them."""
    names = (p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    return sorted(n for n in names if not n.startswith("."))


def _finish(recipe, job, args, env, out, params, model_state, history, training) -> dict:
    family = recipe.family
    with torch.no_grad():
        evaluation = recipe.evaluate(job, params, model_state, args, env.device)
    metrics = {
        **evaluation.metrics,
        "final_loss": round(history[-1]["loss"], 6),
        "mean_last_50_steps": _tail_means(history),
        "steps": args.steps,
        "batch_size": args.batch_size,
        **training,
        **getattr(job.source, "report", dict)(),
        "device": str(env.device),
        "dist": args.dist,
        "world_size": env.world_size,
        "activation_checkpointing": args.ac,
        "precision": args.precision,
    }
    files = {
        checkpoint.METRICS_FILE: metrics,
        RUN_FILE: (out / RUN_FILE).read_text(),
        records.METRICS_LOG: (out / records.METRICS_LOG).read_text(),
        **job.files,
    }
    if model_state is not None:
        files[MODEL_STATE_FILE] = model_state
    config = {"model": family.name, family.name: job.cfg.to_dict(), **job.config, "seed": args.seed}
    checkpoint.save(out, params, config=config, files=files)
    curves = {name: [r[name] for r in history] for name in job.curves}
    plot_loss(curves, out / LOSS_PLOT, title=evaluation.title)
    for name, write in evaluation.plots.items():
        write(out / name)
    print(json.dumps({k: metrics[k] for k in evaluation.headline}))
    print(f"wrote {out}/: {' '.join(_listing(out))}")
    return metrics
