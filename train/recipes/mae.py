"""Pretrain a masked autoencoder on shapes-world images or sound-world clips, then probe
its frozen encoder.

``python -m train mae --modality image --out runs/mae`` trains ``mae_tiny`` (32² scenes in
4² patches, 75% masked) on training scenes; ``--modality audio`` trains ``mae_audio_tiny``
(80% masked) on one-second clips of the sound world turned into ``[1, 64, 32]`` log-mel
spectrograms by :data:`train.recipes._ssl.SOUND_MEL`. The loss is MAE's, at the preset's mask ratio.

Evaluation, on single-object scenes / single-sound clips of every class (held-out
combinations included, none of which the pretraining ever saw):

- ``reconstructions.png``: held-out inputs, the same with the masked patches blanked, and
  the reconstruction (visible patches as given, masked ones predicted);
- ``heldout_masked_mse``: the MAE loss on the held-out inputs (``_unseen_combos``: on the
  combinations pretraining never saw), with a fixed mask key;
- linear probes (:mod:`train.probe`) of the frozen encoder's features, the mean of its
  patch tokens over an unmasked input. The mean, not the class token: MAE's loss is on the
  patches, the class token is at most context to the image decoder (the audio decoder
  does not see it), and the mean serves the random-init encoder as well (after 1500 steps
  on the shapes the class token read shape no better: 0.32 iid against the mean's 0.34).

The probe sets, their splits (``<attr>_heldout``, ``_iid``, ``_pretrain_heldout``) and the
report are :mod:`train.recipes._ssl`'s, shared with ``python -m train data2vec``; every
probe runs on the trained encoder and on the same encoder at its random init (the run's
own starting params). ``probe_accuracy`` is the held-out accuracy of the form attribute,
shape or timbre, which a random encoder cannot read off colours or frequencies alone:
colour and pitch are nearly linear in the input's pixels and mel bands, and a random-init
encoder's features already read them at 0.8 or more held out (0.97 or more on their iid
split), so they are reported beside it but are no test of what pretraining learnt.
``probe_gain_points`` is 100 x (trained - random init).
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial

import torch

import fmm
import models
from models import mae
from train import probe
from train.loop import Defaults, Evaluation, Job, Recipe
from train.loop.engine import base_keys
from train.plots_generation import save_image_grid
from train.recipes._ssl import (
    add_probe_arguments,
    data_for,
    probe_report,
    probe_sets,
    run_config,
    source,
)

PRESETS = {"image": "mae_tiny", "audio": "mae_audio_tiny"}
# Encoder sizes over the preset: "tiny" is the preset itself.
SIZES = {
    "tiny": {},
    "small": {
        "width": 128,
        "layers": 4,
        "heads": 4,
        "mlp_dim": 256,
        "decoder_width": 64,
        "decoder_layers": 2,
        "decoder_heads": 2,
        "decoder_mlp_dim": 128,
    },
}
MASK_FILL = (0.35, 0.35, 0.6)  # a blanked patch in the figure: in neither world's palette


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--modality", default="image", choices=tuple(PRESETS),
        help="image: mae_tiny on 32² scenes; audio: mae_audio_tiny on 64x32 log-mel "
        "spectrograms of one-second clips (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--size", default="tiny", choices=tuple(SIZES),
        help="tiny: the preset; small: a 4-layer width-128 encoder (default: %(default)s)",
    )  # fmt: skip
    add_probe_arguments(parser)


@torch.no_grad()
def features(params, cfg: mae.MAEConfig, x: torch.Tensor, device, chunk: int = 256) -> torch.Tensor:
    """The probe's features ``[N, width]`` (on the CPU): the frozen encoder's mean patch
    token over every patch of ``x [N, C, H, W]``, unmasked."""
    out = [
        mae.encode(params, x[i : i + chunk].to(device), cfg=cfg).sequence[:, 1:].mean(1).cpu()
        for i in range(0, len(x), chunk)
    ]
    return torch.cat(out)


@torch.no_grad()
def reconstructions(
    params, cfg: mae.MAEConfig, x: torch.Tensor, key, device, chunk: int = 256
) -> mae.Reconstruction:
    """:func:`models.mae.reconstruct` of ``x [N, ...]`` a chunk at a time (each chunk's mask
    from ``key`` folded with its offset), on the CPU, without the encoding."""
    parts = []
    for i in range(0, len(x), chunk):
        k = fmm.random.fold_in(key, i)
        out = mae.reconstruct(params, x[i : i + chunk].to(device), cfg=cfg, key=k)
        parts.append([t.cpu() for t in (out.pred, out.target, out.mask)])
    pred, target, mask = (torch.cat(t) for t in zip(*parts))
    return mae.Reconstruction(None, pred, target, mask)


def heldout_loss(out: mae.Reconstruction, cfg: mae.MAEConfig, rows: torch.Tensor) -> float:
    """MAE's loss over the examples ``rows`` (a bool mask) of ``out``; every example masks
    the same number of patches, so it is the mean of their losses."""
    value = mae.masked_loss(
        out.pred[rows], out.target[rows], out.mask[rows], norm_pix=cfg.norm_pix_loss
    )
    return round(value.item(), 6)


def as_pictures(x: torch.Tensor, modality: str) -> torch.Tensor:
    """Inputs ``[N, C, H, W]`` as RGB pictures in [0, 1]: images as they are, spectrograms
    (normalised log-mels) grey, time to the right and low frequencies at the bottom.
    Blanked (``nan``) pixels are painted :data:`MASK_FILL`."""
    if modality == "audio":
        x = ((x + 2.5) / 5).clamp(0, 1).transpose(-1, -2).flip(-2).expand(-1, 3, -1, -1)
    fill = torch.tensor(MASK_FILL).view(1, 3, 1, 1).expand_as(x)
    return torch.where(x.isnan(), fill, x.clamp(0, 1))


def figure(inputs: torch.Tensor, out: mae.Reconstruction, cfg, modality: str, title: str):
    """``write(path)``: rows of 8 held-out inputs, the same masked, their reconstructions."""
    blank = torch.where(out.mask.bool()[..., None], torch.nan, out.target)
    rows = [inputs, mae.unpatchify(blank, cfg), mae.composite(out, cfg)]
    grid = torch.cat([as_pictures(r, modality) for r in rows])
    return partial(
        save_image_grid, grid, columns=len(inputs),
        row_labels=["input", f"{cfg.ratio:.0%} masked", "reconstruction"], title=title,
    )  # fmt: skip


def prepare(args: argparse.Namespace, device: torch.device) -> Job:
    data = data_for(args.modality)
    preset = PRESETS[args.modality]
    cfg = dataclasses.replace(models.get_config(preset), **SIZES[args.size])
    rows, cols = cfg.grid
    return Job(
        cfg=cfg,
        source=source(data, args),
        config={"preset": preset, **run_config(data)},
        curves=("loss",),
        describe=f"{preset} ({rows}x{cols} patches, {cfg.ratio:.0%} masked)",
        context=data,
    )


def evaluate(job: Job, params, model_state, args: argparse.Namespace, device) -> Evaluation:
    cfg, data = job.cfg, job.context
    sets = probe_sets(data, args.probe_per_class, seed=args.seed)
    # The random-init encoder is the run's own starting point.
    random_init = fmm.tree.map(lambda t: t.to(device), mae.init(cfg, base_keys(args.seed)["init"]))
    metrics = probe_report(
        sets,
        data.modality,
        trained=features(params, cfg, sets.inputs, device),
        random_init=features(random_init, cfg, sets.inputs, device),
        budget=probe.Budget(steps=args.probe_steps),
    )
    test_x, test_unseen = sets.inputs[sets.test], sets.unseen[sets.test]
    out = reconstructions(params, cfg, test_x, fmm.random.key(args.seed + 3), device)
    metrics["heldout_masked_mse"] = heldout_loss(out, cfg, torch.ones_like(test_unseen))
    metrics["heldout_masked_mse_unseen_combos"] = heldout_loss(out, cfg, test_unseen)
    # The figure: the first example of every held-out class (at most 4), and of 4 seen
    # classes spread over the label order (so over colours / pitches too).
    firsts = torch.arange(0, len(test_x), args.probe_per_class)
    held, seen = firsts[test_unseen[firsts]][:4], firsts[~test_unseen[firsts]]
    picks = torch.cat([held, seen[torch.linspace(0, len(seen) - 1, 4).long()]])
    sub = mae.Reconstruction(None, *(t[picks] for t in (out.pred, out.target, out.mask)))
    title = (
        f"held-out {data.modality} inputs ({len(held)} unseen combinations, 4 seen), masked, "
        f"reconstructed (masked MSE {metrics['heldout_masked_mse']:.3f})"
    )
    return Evaluation(
        metrics=metrics,
        headline=("probe_accuracy", "probe_accuracy_random_init", "probe_gain_points",
                  "heldout_masked_mse"),
        title=f"MAE masked-patch loss ({data.modality}, train batches)",
        plots={"reconstructions.png": figure(test_x[picks], sub, cfg, data.modality, title)},
    )  # fmt: skip


RECIPE = Recipe(
    name="mae",
    help="pretrain a masked autoencoder on shapes-world images or sound-world clips, "
    "linear-probe its frozen encoder",
    family=mae.FAMILY,
    defaults=Defaults(steps=6000, batch_size=64, lr=2e-3, weight_decay=0.05, warmup=50),
    prepare=prepare,
    evaluate=evaluate,
    extra_arguments=_arguments,
)
