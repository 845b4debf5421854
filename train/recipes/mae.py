"""Pretrain a masked autoencoder on shapes-world images or sound-world clips, then probe
its frozen encoder.

``python -m train mae --modality image --out runs/mae`` trains ``mae_tiny`` (32² scenes in
4² patches, 75% masked) on training scenes; ``--modality audio`` trains ``mae_audio_tiny``
(80% masked) on one-second clips of the sound world turned into ``[1, 64, 32]`` log-mel
spectrograms by :data:`SOUND_MEL`. The loss is MAE's, at the preset's mask ratio.

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

What "held-out" means for a probe: the probe reads one attribute (shape or colour of a
scene; timbre or pitch of a sound). It is fitted on one eval set's seen combinations
(``--probe-per-class`` examples of each) and scored on a second set drawn with another
seed: ``<attr>_heldout`` on its held-out (colour, shape) / (pitch, timbre) combinations,
which neither the encoder nor the probe has seen, ``<attr>_iid`` on its seen ones (new
draws of the combinations it was fitted on: the random-split figure), and
``<attr>_pretrain_heldout`` on its held-out combinations again, but with the probe fitted
on every combination of the first set: held out of pretraining only, so it asks whether
the encoder's features of combinations it never saw can be read, without also asking the
probe to compose attributes it never saw together. Every probe is run
twice: on the trained encoder and on the same encoder at its random init (the run's own
starting params). ``probe_accuracy`` is the held-out accuracy of the form attribute,
shape or timbre, which a random encoder cannot read off colours or frequencies alone:
colour and pitch are nearly linear in the input's pixels and mel bands, and a random-init
encoder's features already read them at 0.8 or more held out (0.97 or more on their
iid split), so they are reported beside it but are no test of what pretraining learnt. ``probe_gain_points`` is 100 x (trained -
random init).
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial

import torch

import fmm
import models
from fmm.audio import MelConfig, log_mel
from models import mae
from train import probe
from train.data import WorldConfig, is_holdout, sample_scenes, sounds
from train.data import eval_set as scene_eval_set
from train.loop import Defaults, Evaluation, Job, Recipe, SeededSource
from train.loop.engine import base_keys
from train.plots_generation import save_image_grid
from train.recipes import number

PRESETS = {"image": "mae_tiny", "audio": "mae_audio_tiny"}
SOUND_SECONDS = 1.0
# A log-mel sized for mae_audio_tiny: 25 ms frames every 15.6 ms over one second at 16 kHz
# (65 frames, cut to 64) in 32 mel bands up to Nyquist, normalised by the sound world's
# mean and std (measured over 256 training clips: -4.35, 3.18).
SOUND_MEL = MelConfig(
    sample_rate=16000, frame_length=400, hop=250, n_fft=512, mels=32, frames=64,
    mean=-4.35, std=3.18,
)  # fmt: skip
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
# The attributes probed, per modality: (name, the form attribute first).
ATTRIBUTES = {"image": ("shape", "color"), "audio": ("timbre", "pitch")}
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
    parser.add_argument(
        "--sound-pool", type=number(at_least=1), default=2048,
        help="audio: training clips rendered once, batches drawn from them (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--probe-per-class", type=number(at_least=1), default=40,
        help="examples per class in each of the probe's two sets (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--probe-steps", type=number(at_least=1), default=probe.Budget().steps,
        help="full-batch steps of each linear probe (default: %(default)s)",
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Data:
    """What a run trains on: ``world`` (a :class:`WorldConfig` or a
    :class:`~train.data.sounds.SoundWorldConfig`) and, for audio, its front end ``mel``."""

    modality: str
    world: WorldConfig | sounds.SoundWorldConfig
    mel: MelConfig | None = None


def data_for(modality: str) -> Data:
    """The built-in world and front end of ``modality`` (``"image"`` or ``"audio"``)."""
    if modality == "image":
        return Data("image", WorldConfig())
    return Data("audio", sounds.SoundWorldConfig(seconds=SOUND_SECONDS), SOUND_MEL)


def spectrograms(waves: torch.Tensor, mel: MelConfig) -> torch.Tensor:
    """``waves [B, samples]`` -> the MAE's input ``[B, 1, frames, mels]``."""
    return log_mel(waves, mel)[:, None]


def sound_pool(data: Data, clips: int, *, seed: int, chunk: int = 256) -> torch.Tensor:
    """``clips`` training spectrograms ``[clips, 1, frames, mels]``, rendered once: the sound
    world's synthesis costs several times the tiny MAE's step, so audio runs draw their
    batches from this pool rather than render each one."""
    g = torch.Generator().manual_seed(seed)
    parts = [
        spectrograms(
            sounds.sample_sounds(data.world, min(chunk, clips - i), generator=g).waves, data.mel
        )
        for i in range(0, clips, chunk)
    ]
    return torch.cat(parts)


def training_batch(data: Data, pool, generator: torch.Generator, batch_size: int) -> dict:
    """A batch of training inputs, never of a held-out combination: fresh scenes ``images
    [B, 3, H, W]``, or ``spectrograms [B, 1, frames, mels]`` drawn from ``pool`` (the
    :func:`sound_pool`; ``None`` for images)."""
    if data.modality == "image":
        return {"images": sample_scenes(data.world, batch_size, generator=generator).images}
    return {"spectrograms": pool[torch.randint(len(pool), (batch_size,), generator=generator)]}


def probe_set(
    data: Data, n_per_class: int, *, seed: int
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One object / sound of every class ``n_per_class`` times: ``(inputs [N, ...],
    {attribute: (labels [N], classes)}, unseen [N] bool)``, ``unseen`` marking the held-out
    combinations."""
    world = data.world
    if data.modality == "image":
        images, labels = scene_eval_set(world, n_per_class, seed=seed)
        n = len(world.shapes)
        attributes = {
            "shape": (labels % n, n),
            "color": (labels // n, len(world.colors)),
        }
        return images, attributes, is_holdout(world, labels)
    clips = sounds.eval_set(world, n_per_class, seed=seed)
    attributes = {
        "timbre": (clips.timbre, len(world.timbres)),
        "pitch": (clips.pitch, len(world.pitches)),
    }
    return spectrograms(clips.waves, data.mel), attributes, sounds.is_holdout(world, clips.labels)


def probe_tasks(attributes: dict, unseen: torch.Tensor, fitted: torch.Tensor) -> dict:
    """The probe :class:`~train.probe.Task` s over two sets' rows (``fitted [N]`` marks the
    first set's), per attribute: fitted on the first set's seen rows and scored on the
    second set's held-out rows (``<attr>_heldout``) and seen rows (``<attr>_iid``); and
    fitted on all the first set's rows, scored on the second set's held-out rows
    (``<attr>_pretrain_heldout``: the combinations held out of pretraining only)."""
    tasks = {}
    for name, (labels, classes) in attributes.items():
        seen = fitted & ~unseen
        tasks[f"{name}_heldout"] = probe.Task(labels, seen, ~fitted & unseen, classes)
        tasks[f"{name}_iid"] = probe.Task(labels, seen, ~fitted & ~unseen, classes)
        tasks[f"{name}_pretrain_heldout"] = probe.Task(labels, fitted, ~fitted & unseen, classes)
    return tasks


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


def _pictures(x: torch.Tensor, modality: str) -> torch.Tensor:
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
    pictures = torch.cat([_pictures(r, modality) for r in rows])
    return partial(
        save_image_grid, pictures, columns=len(inputs),
        row_labels=["input", f"{cfg.ratio:.0%} masked", "reconstruction"], title=title,
    )  # fmt: skip


def prepare(args: argparse.Namespace, device: torch.device) -> Job:
    data = data_for(args.modality)
    preset = PRESETS[args.modality]
    cfg = dataclasses.replace(models.get_config(preset), **SIZES[args.size])
    rows, cols = cfg.grid
    # The pool's seed differs from the stream's, which draws its rows.
    pool = None if data.mel is None else sound_pool(data, args.sound_pool, seed=args.seed + 4)
    return Job(
        cfg=cfg,
        source=SeededSource(
            partial(training_batch, data, pool), batch_size=args.batch_size, seed=args.seed
        ),
        config={
            "preset": preset,
            "modality": args.modality,
            "world": dataclasses.asdict(data.world),
            **({"mel": dataclasses.asdict(data.mel)} if data.mel else {}),
        },
        curves=("loss",),
        describe=f"{preset} ({rows}x{cols} patches, {cfg.ratio:.0%} masked)",
        context=data,
    )


def evaluate(job: Job, params, model_state, args: argparse.Namespace, device) -> Evaluation:
    cfg, data = job.cfg, job.context
    fit_x, fit_attrs, fit_unseen = probe_set(data, args.probe_per_class, seed=args.seed + 1)
    test_x, test_attrs, test_unseen = probe_set(data, args.probe_per_class, seed=args.seed + 2)
    x = torch.cat([fit_x, test_x])
    attributes = {
        name: (torch.cat([labels, test_attrs[name][0]]), classes)
        for name, (labels, classes) in fit_attrs.items()
    }
    unseen = torch.cat([fit_unseen, test_unseen])
    fitted = torch.arange(len(x)) < len(fit_x)
    # The random-init encoder is the run's own starting point.
    random_init = fmm.tree.map(lambda t: t.to(device), mae.init(cfg, base_keys(args.seed)["init"]))
    metrics = probe.compare(
        probe_tasks(attributes, unseen, fitted),
        trained=features(params, cfg, x, device),
        random_init=features(random_init, cfg, x, device),
        headline=(f"{ATTRIBUTES[data.modality][0]}_heldout",),
        budget=probe.Budget(steps=args.probe_steps),
    )
    out = reconstructions(params, cfg, test_x, fmm.random.key(args.seed + 3), device)
    metrics["heldout_masked_mse"] = heldout_loss(out, cfg, torch.ones_like(test_unseen))
    metrics["heldout_masked_mse_unseen_combos"] = heldout_loss(out, cfg, test_unseen)
    metrics["probe_examples"] = {"fit": int((fitted & ~unseen).sum()), "test": len(test_x)}
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
