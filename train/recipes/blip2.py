"""BLIP-2 on the shapes world: a Q-Former between a trained CLIP's frozen image tower and a
frozen GPT, then captions and answers by generation.

``python -m train blip2 --clip runs/clip --out runs/blip2`` runs three phases, each through
:func:`train.loop.run`:

1. ``lm`` (skipped with ``--lm RUN``): ``models.gpt``'s tiny preset on shapes-world
   captions and question-answer texts ("what colour is the circle red"), ``--lm-steps``.
   fmm has no recipe that trains a plain GPT on captions, and a separate one would need
   its own flags, tests and docs for a model only this recipe reads, so it is a phase here.
   Every text follows ``queries`` placeholder tokens (never targets), so the LM learns the
   text at the positions it has later, after the query prefix.
2. ``stage1``: the Q-Former's ITC + ITM + ITG over the CLIP tower (frozen) on captions,
   ``--stage1-steps``.
3. ``stage2``: the queries projected into the frozen LM as its prefix, trained on captions
   and question-answer texts, ``--stage2-steps``. Only the Q-Former's query path, the
   queries, ``ln_vision`` and ``lm_proj`` train: the image tower, the LM and stage one's
   heads are frozen (no gradient, no update, no weight decay: ``Job.trainable``).

``--out`` holds the stage-two run (``load_run(out, family="blip2")``: the whole model,
image tower and LM included), with the phase runs in ``lm/`` (a gpt run ``--lm`` accepts)
and ``stage1/``. Evaluation on held-out single-object scenes: greedy captions through
:func:`fmm.decoding.generate` with the queries as a ``prefix``, exact-match of the colour
and shape words, and VQA by generation ("what colour is the circle", "what shape is the red
one": answer-word exact-match), each for seen and never-seen colour x shape combinations;
``captions.png`` shows sample scenes with their generated caption and answers.

The phases' tokenizer, texts and batches live in :mod:`train.recipes.blip2_data`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

import fmm
from fmm import decoding, nn
from models import blip2, gpt
from train.data import WordTokenizer, WorldConfig, is_holdout, sample_scenes
from train.loop import Defaults, Evaluation, Job, Recipe, SeededSource, load_run
from train.loop import run as loop_run
from train.loop.run import check_out
from train.plots_generation import save_image_grid
from train.recipes import number
from train.recipes.blip2_data import (
    TEXT_LEN,
    lm_batch,
    question,
    stage_one_batch,
    stage_two_batch,
    tokenizer_for,
)
from train.recipes.clip import normalize_images  # as `python -m train clip` trained the tower
from train.recipes.generate import first_word, split_rates

# Captions are generated after one of the world's caption openings: an empty prompt may
# start a question instead (the LM's texts hold both).
CAPTION_PROMPT = "there is a"
# Stage one's heads, and the Q-Former's text embeddings and text MLPs: stage two runs the
# queries alone, so it reads none of them (and must not decay them).
STAGE_ONE_ONLY = ("itm_head", "text_proj", "vision_proj", "clm_head", "log_temp")
TEXT_ONLY = ("token", "pos", "mlp", "norm2")


def blip2_config(clip_cfg, tokenizer: WordTokenizer, lm_cfg=None) -> blip2.Blip2Config:
    """``blip2_tiny``'s Q-Former over ``clip_cfg``'s image tower (its sizes and layout), with
    the tokenizer's ids (<unk> as [DEC]); stage two with ``lm_cfg``."""
    t = clip_cfg.image_transformer
    return dataclasses.replace(
        blip2.blip2_tiny(), vocab_size=tokenizer.vocab_size, bos_id=tokenizer.unk_id,
        max_positions=TEXT_LEN, image_size=clip_cfg.image_size, patch_size=clip_cfg.patch_size,
        image_width=t.width, image_layers=t.layers, image_heads=t.heads, image_mlp_dim=t.hidden,
        image_norm_eps=t.norm_eps, image_act=t.act, image_patch_bias=False, image_norm_pre=True,
        lm=lm_cfg, stage=1 if lm_cfg is None else 2,
    )  # fmt: skip


def _load(flag: str, path: Path, family: str):
    try:
        return load_run(path, family=family)
    except ValueError as e:  # CheckpointError: say which flag named the run
        raise ValueError(f"{flag} {path}: {e}") from None


def _clip_run(path: Path):
    run = _load("--clip", path, "clip")
    cfg = run.cfg
    if cfg.frames is not None or cfg.in_channels != 3 or not isinstance(cfg.image_size, int):
        raise ValueError(f"--clip {path}: not an image CLIP of the shapes world (video or audio)")
    if "data" in run.config:
        raise ValueError(f"--clip {path}: trained on --data, not the shapes world")
    return run


def _lm_run(path: Path, tokenizer: WordTokenizer, queries: int):
    run = _load("--lm", path, "gpt")
    if run.cfg.vocab_size != tokenizer.vocab_size or run.cfg.context_length < queries + TEXT_LEN:
        raise ValueError(
            f"--lm {path}: a gpt of vocab {run.cfg.vocab_size} and context "
            f"{run.cfg.context_length}; this recipe needs vocab {tokenizer.vocab_size} and "
            f"context >= {queries + TEXT_LEN} (the lm/ run of an earlier blip2 run)"
        )
    return run


def _arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--clip", type=Path, required=True, help="run directory of `python -m train clip`")
    add("--lm", type=Path, default=None,
        help="a trained LM: the lm/ run of an earlier blip2 run (default: train one)")  # fmt: skip
    add("--lm-steps", type=number(at_least=1), default=400,
        help="steps of the LM phase (default: %(default)s)")  # fmt: skip
    add("--stage1-steps", type=number(at_least=1), default=200,
        help="steps of stage one: ITC + ITM + ITG (default: %(default)s)")  # fmt: skip
    add("--stage2-steps", type=number(at_least=1), default=900,
        help="steps of stage two: captioning through the frozen LM (default: %(default)s)")  # fmt: skip
    add("--qa-share", type=number(float, at_least=0, at_most=1), default=0.5,
        help="share of LM and stage-two texts that are a question and its answer "
        "(default: %(default)s)")  # fmt: skip
    add("--eval-scenes", type=number(at_least=1), default=480,
        help="held-out single-object scenes to caption and question (default: %(default)s)")  # fmt: skip


def _resolve(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps != args.stage2_steps:
        raise SystemExit(
            "--steps: blip2 trains in phases: pass --lm-steps, --stage1-steps, --stage2-steps"
        )
    args.steps = args.stage2_steps


def _trainable_stage_two(name: str) -> bool:
    parts = name.split(".")  # qformer.token.weight, qformer.transformer.blocks.N.mlp.fc1...
    if parts[0] in blip2.FROZEN_PARTS or parts[0] in STAGE_ONE_ONLY:
        return False
    return (
        parts[0] != "qformer"
        or (parts[1] if parts[1] != "transformer" else parts[4]) not in TEXT_ONLY
    )


def _summary(name: str, metrics: dict) -> dict:
    keep = ("steps", "final_loss", "mean_last_50_steps", "train_seconds")
    return {f"{name}_{k}": metrics[k] for k in keep if k in metrics}


def _by_phase(args, device):
    raise RuntimeError("blip2's jobs are built by run_phases, one per phase")


def _no_evaluation(job, params, model_state, args, device) -> Evaluation:
    return Evaluation(metrics={}, headline=("final_loss", "train_seconds"))


def query_prefix(params, images: torch.Tensor, *, cfg: blip2.Blip2Config) -> torch.Tensor:
    """The frozen LM's block inputs for the image's queries: ``lm_proj`` of the Q-Former's
    query outputs plus the LM's positions ``0..Q-1`` (as ``blip2.caption_logits`` builds
    them). ``images [B, 3, H, W]`` normalised -> ``[B, queries, lm width]``."""
    img = blip2.encode_image(params, images, cfg=cfg)
    q = blip2.qformer(params, cfg=cfg, image_embeds=img)
    return nn.linear(params["lm_proj"], q) + params["lm"]["pos"][: cfg.queries]


def continue_prompts(params, prefix, prompts: list[str], tokenizer, cfg, max_new: int) -> list[str]:
    """Greedy continuations of equal-length ``prompts`` after ``prefix``, through the cache."""
    ids = tokenizer.encode(prompts, TEXT_LEN)
    length = int((ids != tokenizer.pad_id).sum(1).max()) - 1  # drop <eot>
    out = decoding.generate(
        params["lm"], ids[:, :length].to(prefix.device), cfg=gpt.decoder_spec(cfg.lm),
        prefix=prefix, max_new_tokens=max_new, eos_id=tokenizer.eot_id,
    )  # fmt: skip
    return tokenizer.decode(out.tokens.cpu())


def score(params, cfg, world, tokenizer, *, n: int, seed: int, device) -> dict:
    """Captions and answers for ``n`` held-out single-object scenes (every combination,
    never-seen ones included): exact-match rates, and the first 8 scenes' outputs."""
    scenes = sample_scenes(world, n, generator=torch.Generator().manual_seed(seed), split="eval")
    labels = scenes.colors * len(world.shapes) + scenes.shapes
    unseen = is_holdout(world, labels)
    captions, colour_answers, shape_answers = [], [], []
    for i in range(0, n, 128):
        prefix = query_prefix(
            params, normalize_images(scenes.images[i : i + 128]).to(device), cfg=cfg
        )
        colors, shapes = scenes.colors[i : i + 128].tolist(), scenes.shapes[i : i + 128].tolist()
        go = partial(continue_prompts, params, prefix, tokenizer=tokenizer, cfg=cfg)
        said = go([CAPTION_PROMPT] * len(colors), max_new=TEXT_LEN - 4)
        captions += [f"{CAPTION_PROMPT} {c}" for c in said]
        pairs = list(zip(colors, shapes))
        colour_answers += go([question(world, *p, "colour")[0] for p in pairs], max_new=2)
        shape_answers += go([question(world, *p, "shape")[0] for p in pairs], max_new=2)
    true_c = [world.colors[c] for c in scenes.colors.tolist()]
    true_s = [world.shapes[s] for s in scenes.shapes.tolist()]
    said_c = [first_word(c.split(), world.colors) for c in captions]
    said_s = [first_word(c.split(), world.shapes) for c in captions]
    hit = lambda said, true: torch.tensor([a == b for a, b in zip(said, true)])
    colour_ok, shape_ok = hit(said_c, true_c), hit(said_s, true_s)
    vqa_c = hit([(a.split() or [None])[0] for a in colour_answers], true_c)
    vqa_s = hit([(a.split() or [None])[0] for a in shape_answers], true_s)
    return {
        **split_rates(colour_ok & shape_ok, unseen, "caption_colour_shape_exact"),
        **split_rates(colour_ok, unseen, "caption_colour"),
        **split_rates(shape_ok, unseen, "caption_shape"),
        **split_rates(vqa_c, unseen, "vqa_colour"),
        **split_rates(vqa_s, unseen, "vqa_shape"),
        "eval_scenes": n,
        "eval_unseen_scenes": int(unseen.sum()),
        "samples": [
            {"caption": c, "colour": a, "shape": b}
            for c, a, b in zip(captions[:8], colour_answers[:8], shape_answers[:8])
        ],
        "sample_images": scenes.images[:8],
    }


@dataclass(frozen=True)
class _Phased(Recipe):
    """The blip2 recipe: :meth:`run` trains its three phases, each a :class:`Recipe`."""

    def run(self, args: argparse.Namespace) -> dict:
        return run_phases(args)


def _phase_args(args: argparse.Namespace, out: Path, steps: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "out": out, "steps": steps, "overwrite": False})


def run_phases(args: argparse.Namespace) -> dict:
    """Train the LM (unless ``--lm``), stage one and stage two; returns stage two's metrics."""
    _resolve(args)
    if args.dist or args.resume:
        raise SystemExit(
            "blip2 runs its phases on one process from scratch: drop --dist / --resume"
        )
    args.out = check_out(args, "blip2")
    world = WorldConfig()
    tokenizer = tokenizer_for(world)
    clip_run = _clip_run(args.clip)
    queries = blip2.blip2_tiny().queries
    lm_run = _lm_run(args.lm, tokenizer, queries) if args.lm is not None else None
    phases: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="blip2-phases-"))
    try:
        if lm_run is None:
            lm_cfg = gpt.gpt_tiny(
                vocab_size=tokenizer.vocab_size, context_length=queries + TEXT_LEN
            )
            draw = partial(lm_batch, world, tokenizer, queries, args.qa_share)
            lm_recipe = dataclasses.replace(
                RECIPE, name="blip2-lm", family=gpt.FAMILY,
                prepare=lambda a, d: Job(
                    cfg=lm_cfg, source=SeededSource(draw, batch_size=a.batch_size, seed=a.seed),
                    files={"tokenizer.json": tokenizer.to_json()},
                    describe="gpt_tiny on captions and questions (LM phase)",
                ),
            )  # fmt: skip
            phases.update(
                _summary("lm", loop_run(lm_recipe, _phase_args(args, tmp / "lm", args.lm_steps)))
            )
            lm_run = load_run(tmp / "lm", family="gpt")
        cfg1 = blip2_config(clip_run.cfg, tokenizer)
        image = {k: v for k, v in clip_run.params["image"].items() if k != "proj"}
        init1 = {**blip2.init(cfg1, fmm.random.key(args.seed)), "image": image}
        draw1 = partial(stage_one_batch, world, tokenizer)
        stage1 = dataclasses.replace(
            RECIPE, name="blip2-stage1",
            prepare=lambda a, d: Job(
                cfg=cfg1, source=SeededSource(draw1, batch_size=a.batch_size, seed=a.seed),
                files={"tokenizer.json": tokenizer.to_json()}, init_params=init1,
                trainable=lambda name: not name.startswith("image."),
                curves=("loss", "itc", "itm", "itg"), describe="blip2 stage one (ITC+ITM+ITG)",
            ),
        )  # fmt: skip
        phases.update(
            _summary(
                "stage1", loop_run(stage1, _phase_args(args, tmp / "stage1", args.stage1_steps))
            )
        )
        stage1_params = load_run(tmp / "stage1", family="blip2").params
        cfg2 = blip2_config(clip_run.cfg, tokenizer, lm_run.cfg)
        # The one new part of stage two (blip2.init would build the whole model for it).
        key2 = fmm.random.fold_in(
            fmm.random.fold_in(fmm.random.key(args.seed), "stage2"), "lm_proj"
        )
        lm_proj = nn.init_linear(cfg2.width, cfg2.lm.width, key2)
        init2 = {**stage1_params, "lm_proj": lm_proj, "lm": lm_run.params}
        draw2 = partial(stage_two_batch, world, tokenizer, args.qa_share)
        context = (world, tokenizer, phases)
        stage2 = dataclasses.replace(
            RECIPE,
            prepare=lambda a, d: Job(
                cfg=cfg2, source=SeededSource(draw2, batch_size=a.batch_size, seed=a.seed),
                files={"tokenizer.json": tokenizer.to_json()}, init_params=init2,
                trainable=_trainable_stage_two, context=context,
                config={"clip_run": str(args.clip), "lm_run": str(args.lm or "lm/")},
                describe="blip2 stage two (queries -> frozen gpt_tiny)",
            ),
            evaluate=evaluate,
        )  # fmt: skip
        metrics = loop_run(stage2, args)
        for name in ("lm", "stage1"):
            if (tmp / name).exists():
                shutil.move(str(tmp / name), str(args.out / name))
        return metrics
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def evaluate(job: Job, params, model_state, args: argparse.Namespace, device) -> Evaluation:
    world, tokenizer, phases = job.context
    result = score(params, job.cfg, world, tokenizer, n=args.eval_scenes, seed=args.seed + 1,
                   device=device)  # fmt: skip
    images, samples = result.pop("sample_images"), result["samples"]
    # Short labels: the plot's margin holds about 35 characters.
    cut = len(CAPTION_PROMPT) + 1
    labels = [f"{s['caption'][cut:]} | {s['colour']}, {s['shape']}" for s in samples]
    plot = partial(
        save_image_grid, images, columns=1, row_labels=labels,
        title=f"caption | VQA colour, shape\n(exact {result['caption_colour_shape_exact']:.2f})",
    )  # fmt: skip
    return Evaluation(
        metrics={**result, **phases},
        headline=(
            "caption_colour_shape_exact",
            "caption_colour_shape_exact_unseen",
            "vqa_colour",
            "vqa_shape",
            "train_seconds",
        ),
        title="BLIP-2 stage two: captioning loss through the frozen LM",
        plots={"captions.png": plot},
    )


RECIPE = _Phased(
    name="blip2",
    help="train BLIP-2's Q-Former between a trained CLIP's image tower and a GPT trained on "
    "captions (both frozen); caption and answer questions by generation",
    family=blip2.FAMILY,
    defaults=Defaults(
        steps=None,
        batch_size=64,
        lr=1e-3,
        weight_decay=0.05,
        warmup=30,
        min_batch_size=2,
        depends="--stage2-steps",
    ),
    prepare=_by_phase,
    evaluate=_no_evaluation,
    extra_arguments=_arguments,
)
