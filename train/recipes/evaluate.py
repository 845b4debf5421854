"""``python -m train evaluate``: measure a model on your own data.

::

    python -m train evaluate --run runs/clip --val-data val.csv --zeroshot-data heldout/
    python -m train evaluate --weights ViT-B-32.safetensors --format open_clip \\
        --vocab bpe_simple_vocab_16e6.txt.gz --zeroshot-data imagenet_val/ --out vit.json

The model is a run saved by any training recipe whose family serves embeddings (clip,
flava, albef: its params, tokenizer and image settings) or converted weights
(``--weights`` / ``--format`` / ``--vocab``, read by :func:`train.finetune.load_for_eval`).
``--val-data`` (a pairs table in any format ``--data`` reads) gives image->text and
text->image recall@1/5/10, ``--zeroshot-data`` (an ImageFolder) zero-shot top-1 / top-5
and per-class accuracy with ``--template`` prompts (default: CLIP's ensemble for CLIP's
tokenizer, the bare class name for a model trained on your own captions; see
:func:`train.evaluate_data.default_templates`). The figures go to ``--out`` (default
``RUN/eval.json``), written atomically, the per-class plot beside it
(``eval_zero_shot.png``), and the headline figures are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

import fmm
from train import evaluate_data
from train.checkpoint import write_json
from train.data.pipeline import default_workers
from train.finetune import FORMATS, load_for_eval
from train.plots import plot_accuracy_bars
from train.recipes import add_device_argument, device_of, existing_file, number
from train.recipes.zeroshot import _template

# The built-in shapes world's normalisation (train.recipes.clip.normalize_images): what a
# run that records no image statistics of its own was trained with.
SHAPES_MEAN, SHAPES_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
HEADLINE = ("zero_shot_top1", "zero_shot_top5", "image_to_text_r1", "text_to_image_r1")


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """``--val-data``, ``--zeroshot-data`` and ``--template``: the evaluation flags shared
    by ``evaluate`` and the training recipes that take them."""
    parser.add_argument(
        "--val-data", type=Path, default=None,
        help="image-caption pairs (any format --data reads: csv, folder, wds, hf, coco, ...): "
        "image<->text recall@1/5/10",
    )  # fmt: skip
    parser.add_argument(
        "--zeroshot-data", type=Path, default=None,
        help="an ImageFolder (one sub-folder per class, '_' read as a space): zero-shot "
        "top-1/top-5 and per-class accuracy",
    )  # fmt: skip
    parser.add_argument(
        "--val-split", default=None,
        help="the split of a Karpathy JSON or datasets --val-data (e.g. test)",
    )  # fmt: skip
    parser.add_argument(
        "--template", action="append", type=_template, default=None,
        help="zero-shot prompt with one {} for the class name; repeat for an ensemble "
        "(default: '{}' and CLIP's 7 ImageNet templates with CLIP's tokenizer, '{}' alone "
        "for a model trained on your own captions)",
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", type=Path, help="a run directory saved by a training recipe")
    model.add_argument(
        "--weights", type=Path,
        help="CLIP weights (.safetensors, .bin, .pt, or a Hugging Face save_pretrained "
        "folder) with --format and --vocab",
    )  # fmt: skip
    parser.add_argument("--format", choices=FORMATS, default=None, help="the layout of --weights")
    parser.add_argument(
        "--vocab", type=existing_file, default=None,
        help="CLIP BPE vocabulary for --weights (bpe_simple_vocab_16e6.txt.gz)",
    )  # fmt: skip
    add_evaluation_arguments(parser)
    for flag, default, what in (
        ("--csv-img-key", "filepath", "CSV/JSONL image path column"),
        ("--csv-caption-key", "title", "CSV/JSONL caption column"),
        ("--csv-separator", None, "CSV separator (default: from the extension)"),
        ("--image-column", "image", "datasets/parquet image column"),
        ("--text-column", "text", "datasets/parquet text column"),
        ("--image-root", None, "where COCO/Karpathy images lie"),
    ):
        shown = f" (default: {default})" if default else ""
        parser.add_argument(flag, default=default, help=f"--val-data's {what}{shown}")
    parser.add_argument(
        "--batch-size", type=number(at_least=1), default=256,
        help="images or texts per model call (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=number(at_least=0), default=None,
        help="image-decoding processes (default: min(4, cpus - 1))",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None,
        help="the figures as JSON (default: RUN/eval.json); the plot is written beside it",
    )  # fmt: skip
    add_device_argument(parser)


# open_table's options and the flags that set them (the data flags of the training
# recipes, train.data.flags; the evaluate command declares the same ones).
_TABLE_OPTIONS = {
    "img_key": "csv_img_key", "caption_key": "csv_caption_key", "separator": "csv_separator",
    "image_column": "image_column", "text_column": "text_column", "image_root": "image_root",
}  # fmt: skip


def open_eval_table(args: argparse.Namespace, flag: str):
    """The table ``--val-data`` or ``--zeroshot-data`` names (``None`` when not given), read
    with the data flags the command has (``--csv-img-key``, ..., ``--val-split``)."""
    from train.data.formats import open_table

    path = getattr(args, flag.removeprefix("--").replace("-", "_"))
    if path is None:
        return None
    options = {
        key: getattr(args, dest) for key, dest in _TABLE_OPTIONS.items() if hasattr(args, dest)
    }
    if flag == "--val-data":
        options["split"] = args.val_split
    try:
        return open_table(path, **options)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{flag} {path}: {e}") from None


def image_settings(config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` a run's images were normalised with: the ``"image_mean"`` /
    ``"image_std"`` its ``config.json`` records, else the shapes world's."""
    return tuple(config.get("image_mean", SHAPES_MEAN)), tuple(config.get("image_std", SHAPES_STD))


def run_embedder(run, *, device: torch.device) -> evaluate_data.Embedder:
    """The :class:`~train.evaluate_data.Embedder` of a saved run (:func:`train.loop.load_run`):
    its tokenizer, and CLIP's eval transform at the model's image size with the run's
    mean/std."""
    from train.data.images import eval_transform

    mean, std = image_settings(run.config)
    size = run.family.serving.image_shape(run.cfg)[-1]
    transform = partial(eval_transform, size=size, mean=mean, std=std)
    return evaluate_data.embedder_for(
        run.family, run.params, run.cfg, run.tokenizer, transform=transform, device=device
    )


def _weights_embedder(args, device: torch.device) -> evaluate_data.Embedder:
    from train.data.images import eval_transform

    if args.format is None:
        raise SystemExit(f"--weights needs --format ({', '.join(FORMATS)})")
    family, cfg, params, tokenizer, settings = load_for_eval(args.weights, args.format, args.vocab)
    params = fmm.tree.map(lambda x: x.to(device), params)
    transform = partial(eval_transform, **settings)
    return evaluate_data.embedder_for(
        family, params, cfg, tokenizer, transform=transform, device=device
    )


def evaluate_tables(
    embedder: evaluate_data.Embedder,
    *,
    val,
    zeroshot,
    templates,
    batch_size: int,
    workers: int,
) -> tuple[dict, dict]:
    """``(figures, zero-shot hits)`` on the tables given (``None``: skipped). The figures
    hold ``retrieval: {image_to_text_r1, ..., images, captions}`` and the ``zero_shot_*``
    keys; the second dict is what :func:`write_zero_shot_plot` draws."""
    figures, shot = {}, {}
    common = dict(batch_size=batch_size, workers=workers)
    if val is not None:
        figures["retrieval"] = evaluate_data.retrieval(val, embedder, **common)
    if zeroshot is not None:
        chosen = tuple(templates or embedder.templates)
        shot = evaluate_data.zero_shot(zeroshot, embedder, templates=chosen, **common)
        figures |= {k: v for k, v in shot.items() if k not in ("hits", "labels")}
    return figures, shot


def write_zero_shot_plot(figures: dict, path: Path) -> None:
    """The per-class accuracy bars of a zero-shot evaluation, sorted, worst first."""
    title = (
        f"zero-shot top-1 per class ({figures['zero_shot_classes']} classes)\n"
        f"top-1 {figures['zero_shot_top1']:.3f}, top-5 {figures['zero_shot_top5']:.3f}"
    )
    plot_accuracy_bars(figures["zero_shot_per_class"], path, title=title)


# --- during training: --val-data / --zeroshot-data of the training recipes -----------------

EVAL_BATCH = 256  # images or texts per model call while training evaluates
PERIODIC = ("zero_shot_top1", "zero_shot_top5")


class UserEvaluation:
    """A training run's ``--val-data`` / ``--zeroshot-data``: the tables, opened when the job
    is prepared (before any directory is made), scored every ``--eval-every`` steps (as
    ``Job.periodic``: ``self(params, model_state) -> {name: float}``) and at the end
    (:meth:`final`). The model is the job's: its config, its ``tokenizer.json`` and the
    ``image_mean`` / ``image_std`` of its config (else the shapes world's)."""

    def __init__(self, args: argparse.Namespace, job, family, device: torch.device) -> None:
        from train.data.tokenizers import tokenizer_from_json

        self.val = open_eval_table(args, "--val-data")
        self.zeroshot = open_eval_table(args, "--zeroshot-data")
        self.templates = args.template
        self.workers = default_workers() if getattr(args, "workers", None) is None else args.workers
        self.family, self.cfg, self.device = family, job.cfg, device
        self.tokenizer = tokenizer_from_json(job.files["tokenizer.json"])
        self.mean, self.std = image_settings(job.config)

    def figures(self, params) -> tuple[dict, dict]:
        """:func:`evaluate_tables` on the tables, with ``params``."""
        from train.data.images import eval_transform

        size = self.family.serving.image_shape(self.cfg)[-1]
        transform = partial(eval_transform, size=size, mean=self.mean, std=self.std)
        embedder = evaluate_data.embedder_for(
            self.family, params, self.cfg, self.tokenizer, transform=transform, device=self.device
        )
        return evaluate_tables(
            embedder, val=self.val, zeroshot=self.zeroshot, templates=self.templates,
            batch_size=EVAL_BATCH, workers=self.workers,
        )  # fmt: skip

    def __call__(self, params, model_state) -> dict:
        figures, _ = self.figures(params)
        flat = {k: figures[k] for k in PERIODIC if k in figures}
        found = figures.get("retrieval", {})
        return flat | {k: v for k, v in found.items() if k.startswith(("image_to", "text_to"))}

    def final(self, evaluation, params):
        """``evaluation`` (the recipe's own) with these figures added: ``retrieval`` and the
        ``zero_shot_*`` keys; with ``--zeroshot-data`` its zero-shot replaces the recipe's
        built-in one (keys, headline and ``zero_shot.png``)."""
        figures, _ = self.figures(params)
        metrics, plots = dict(evaluation.metrics), dict(evaluation.plots)
        headline = list(evaluation.headline)
        if self.zeroshot is not None:
            # The built-in zero-shot's keys and its image count (eval_images) give way.
            builtin = lambda k: k.startswith("zero_shot") or k == "eval_images"
            metrics = {k: v for k, v in metrics.items() if not builtin(k)}
            plots["zero_shot.png"] = partial(write_zero_shot_plot, figures)
            headline = [k for k in headline if not k.startswith("zero_shot")]
            headline[:0] = ["zero_shot_top1", "zero_shot_top5"]
        if self.val is not None:
            headline[:0] = ["retrieval"]
        metrics |= figures
        return replace(evaluation, metrics=metrics, headline=tuple(headline), plots=plots)


def with_user_evaluation(prepare, family):
    """A recipe's ``prepare`` that also sets ``Job.periodic`` to a :class:`UserEvaluation`
    when ``--val-data`` or ``--zeroshot-data`` is given."""

    def prepared(args: argparse.Namespace, device: torch.device):
        job = prepare(args, device)
        if args.val_data is not None or args.zeroshot_data is not None:
            job.periodic = UserEvaluation(args, job, family, device)
        return job

    return prepared


def with_user_figures(evaluate):
    """A recipe's ``evaluate`` whose :class:`~train.loop.Evaluation` gains the
    :class:`UserEvaluation` figures (see :meth:`UserEvaluation.final`)."""

    def evaluated(job, params, model_state, args: argparse.Namespace, device):
        evaluation = evaluate(job, params, model_state, args, device)
        if isinstance(job.periodic, UserEvaluation):
            return job.periodic.final(evaluation, params)
        return evaluation

    return evaluated


def headline(figures: dict) -> dict:
    """The figures a person reads first: zero-shot top-1/5, R@1 both ways."""
    flat = {**figures, **figures.get("retrieval", {})}
    return {k: flat[k] for k in HEADLINE if k in flat}


def run(args: argparse.Namespace) -> dict:
    """Load the model, evaluate on the data given, write and print the figures."""
    if args.val_data is None and args.zeroshot_data is None:
        raise SystemExit("nothing to evaluate: pass --val-data PATH and/or --zeroshot-data DIR")
    if args.weights is not None and args.out is None:
        raise SystemExit("--out FILE is required with --weights (with --run it is RUN/eval.json)")
    if args.run is not None and (args.format or args.vocab):
        raise SystemExit("--format and --vocab go with --weights, not --run")
    device = device_of(args)
    val, shots = open_eval_table(args, "--val-data"), open_eval_table(args, "--zeroshot-data")
    if args.run is not None:
        from train.loop import load_run

        embedder = run_embedder(load_run(args.run, device=device), device=device)
    else:
        embedder = _weights_embedder(args, device)
    workers = default_workers() if args.workers is None else args.workers
    figures, _ = evaluate_tables(
        embedder, val=val, zeroshot=shots, templates=args.template,
        batch_size=args.batch_size, workers=workers,
    )  # fmt: skip
    out = args.out or args.run / "eval.json"
    write_json(out, figures)
    written = [out]
    if "zero_shot_per_class" in figures:
        written.append(out.with_name(f"{out.stem}_zero_shot.png"))
        write_zero_shot_plot(figures, written[-1])
    print(json.dumps(headline(figures)))
    print(f"wrote {' '.join(str(p) for p in written)}")
    return figures
