"""Pretrain data2vec on shapes-world images, their captions or sound-world clips, then probe
its frozen encoder.

``python -m train data2vec --modality image|text|audio --out runs/d2v`` trains the
modality's tiny preset (:data:`PRESETS`) with data2vec's objective: the student on masked
input regresses its EMA teacher's top-K layer average on the whole input. The teacher is
the family's train state, carried by the loop as ALBEF's momentum encoders are
(``state=`` to the loss, ``update_state`` after each optimizer step, saved as
``model_state.safetensors``). Text: captions of training scenes in the world's words,
``<unk>`` (which captions never produce) as the mask id.

Evaluation, on one-object scenes / one-sound clips / two-object captions of every class
(held-out combinations included, which pretraining never saw; :mod:`train.recipes._ssl`):

- linear probes (:mod:`train.probe`) of the frozen student against the same encoder at its
  random init (the run's own starting params), on the splits the ``mae`` recipe uses:
  ``probe_<attr>_heldout`` / ``_iid`` / ``_pretrain_heldout``. Images: shape (the
  headline) and colour; audio: timbre (the headline) and pitch; text: shape (the
  headline) and colour of the first object a two-object caption names
  (``_ssl.caption_probe_set`` says why that task). Features (``--probe-features``): the
  mean patch feature (text: token), the class token, or every block's mean output;
- ``heldout_regression``: the data2vec loss on the second probe set (the teacher's
  targets, a fixed mask key), ``teacher_student_distance``: the relative L2 distance of
  the teacher from the student (0 would mean the EMA is not lagging);
- ``probes.png``: every probe's accuracy, trained and at random init.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import fmm
import models
from fmm.nn.transformer import block
from models import data2vec
from train import probe
from train.loop import Defaults, Evaluation, Job, Recipe
from train.loop.engine import base_keys
from train.plots import plot_accuracy_bars
from train.recipes._ssl import (
    ATTRIBUTES,
    CONTEXT,
    add_probe_arguments,
    data_for,
    probe_report,
    probe_sets,
    run_config,
    source,
)

PRESETS = {
    "image": "data2vec_image_tiny",
    "text": "data2vec_text_tiny",
    "audio": "data2vec_audio_tiny",
}
FEATURES = ("mean", "cls", "layers")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--modality", default="image", choices=tuple(PRESETS),
        help="image: 32² scenes; text: their captions; audio: 64x32 log-mel spectrograms of "
        "one-second clips (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--probe-features", default="mean", choices=FEATURES,
        help="what the probe reads: the mean patch (text: token) feature, the class token "
        "(images, audio), or every block's mean output side by side (default: %(default)s)",
    )  # fmt: skip
    add_probe_arguments(parser)


def config_for(data) -> data2vec.Data2VecConfig:
    """The modality's tiny preset; text sized to the world's tokenizer, ``<unk>`` the mask."""
    cfg = models.get_config(PRESETS[data.modality])
    if data.modality != "text":
        return cfg
    tok = data.tokenizer
    return dataclasses.replace(
        cfg, vocab_size=tok.vocab_size, context_length=CONTEXT, mask_id=tok.unk_id
    )


def _inputs(cfg, x: torch.Tensor, device) -> dict:
    name = data2vec.INPUTS[cfg.modality]
    x = x.to(device)
    return {
        name: x,
        "valid": x != 0,
    }  # 0: the word tokenizer's <pad> if cfg.modality == "text" else {name: x}


def _block_outputs(params, inputs: torch.Tensor, cfg, **batch) -> list[torch.Tensor]:
    """Every block's output ``[B, S, width]`` (the residual stream), through the tower's
    ``block_fn`` seam, as the family's targets read the teacher's."""
    outputs: list[torch.Tensor] = []

    def record(block_params, x, **kwargs):
        outputs.append(block(block_params, x, **kwargs))
        return outputs[-1]

    data2vec.encode(params, inputs, cfg=cfg, block_fn=record, **batch)
    return outputs


def _pool(h: torch.Tensor, cfg, valid: torch.Tensor | None) -> torch.Tensor:
    """``h [B, S, width]`` -> ``[B, width]``: text the mean over valid tokens, images and
    audio the mean over the patches (the class token left out)."""
    if cfg.modality != "text":
        return h[:, 1:].mean(1)
    w = valid.to(h.dtype)[..., None]
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)


@torch.no_grad()
def features(
    params, cfg: data2vec.Data2VecConfig, x: torch.Tensor, device, *, kind: str = "mean",
    chunk: int = 256,
) -> torch.Tensor:  # fmt: skip
    """The probe's features (on the CPU) of the unmasked ``x [N, ...]``, by ``kind``:
    ``"mean"`` ``[N, width]``, the mean patch feature (text: the mean over its valid tokens;
    :func:`models.data2vec.features`); ``"cls"`` ``[N, width]``, the class token (images,
    audio); ``"layers"`` ``[N, layers * width]``, every block's mean patch (token) output
    side by side."""
    out = []
    for i in range(0, len(x), chunk):
        batch = _inputs(cfg, x[i : i + chunk], device)
        inputs = batch.pop(data2vec.INPUTS[cfg.modality])
        if kind == "mean":
            f = data2vec.features(params, inputs, cfg=cfg, **batch)
        elif kind == "cls":
            f = data2vec.encode(params, inputs, cfg=cfg)[:, 0]
        else:
            layers = _block_outputs(params, inputs, cfg, **batch)
            f = torch.cat([_pool(h, cfg, batch.get("valid")) for h in layers], -1)
        out.append(f.cpu())
    return torch.cat(out)


def _distance(teacher, params) -> float:
    """``|teacher - student| / |student|`` over the teacher's leaves."""
    student = {k: params[k] for k in teacher}
    pairs = zip(fmm.tree.leaves(teacher), fmm.tree.leaves(student))
    diff = sum((t.float() - s.float()).pow(2).sum() for t, s in pairs)
    norm = sum(s.float().pow(2).sum() for s in fmm.tree.leaves(student))
    return round((diff / norm).sqrt().item(), 6)


def prepare(args: argparse.Namespace, device: torch.device) -> Job:
    if args.modality == "text" and args.probe_features == "cls":
        raise ValueError("--probe-features cls: the text encoder has no class token (use mean)")
    data = data_for(args.modality)
    cfg = config_for(data)
    what = (
        f"{cfg.mask_ratio:.0%} of tokens"
        if cfg.modality == "text"
        else f"{cfg.masked}/{cfg.patches} patches"
    )
    return Job(
        cfg=cfg,
        source=source(data, args),
        config={"preset": PRESETS[args.modality], **run_config(data)},
        curves=("loss", "pred_var", "target_var"),
        describe=f"{PRESETS[args.modality]} ({what} masked, top {cfg.top_k} teacher layers)",
        context=data,
    )


def evaluate(job: Job, params, model_state, args: argparse.Namespace, device) -> Evaluation:
    cfg, data = job.cfg, job.context
    sets = probe_sets(data, args.probe_per_class, seed=args.seed)
    # The random-init encoder is the run's own starting point.
    init = data2vec.init(cfg, base_keys(args.seed)["init"])
    random_init = fmm.tree.map(lambda t: t.to(device), init)
    kind = args.probe_features
    metrics = probe_report(
        sets,
        data.modality,
        trained=features(params, cfg, sets.inputs, device, kind=kind),
        random_init=features(random_init, cfg, sets.inputs, device, kind=kind),
        budget=probe.Budget(steps=args.probe_steps),
    )
    test = _inputs(cfg, sets.inputs[sets.test], device)
    key = fmm.random.key(args.seed + 3)
    value, _ = data2vec.loss(params, test, cfg=cfg, key=key, train=False, state=model_state)
    metrics["heldout_regression"] = round(value.item(), 6)
    metrics["teacher_student_distance"] = _distance(model_state["teacher"], params)
    metrics["probe_features"] = kind
    bars = {}
    for name in sets.tasks:
        bars[name] = metrics[f"probe_{name}"]
        bars[f"{name} (random init)"] = metrics[f"probe_{name}_random_init"]
    form = ATTRIBUTES[data.modality][0]
    title = (
        f"data2vec {data.modality}: linear probes of the frozen encoder ({form} held out: "
        f"{metrics['probe_gain_points']:+.1f} points over random init)"
    )
    return Evaluation(
        metrics=metrics,
        headline=("probe_accuracy", "probe_accuracy_random_init", "probe_gain_points",
                  "heldout_regression"),
        title=f"data2vec regression loss ({data.modality}, train batches)",
        plots={"probes.png": lambda path: plot_accuracy_bars(bars, path, title=title)},
    )  # fmt: skip


RECIPE = Recipe(
    name="data2vec",
    help="pretrain data2vec on shapes-world images or captions or sound-world clips, "
    "linear-probe its frozen encoder",
    family=data2vec.FAMILY,
    defaults=Defaults(steps=1500, batch_size=64, lr=1e-3, weight_decay=0.05, warmup=50),
    prepare=prepare,
    evaluate=evaluate,
    extra_arguments=_arguments,
)
