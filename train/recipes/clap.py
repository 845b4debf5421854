"""CLAP-style audio-text contrastive learning on the sound world: ``python -m train clap``.

``clap_tiny`` (:func:`models.clip.clap_tiny`: CLIP with an audio tower, the shared ViT over
``[1, 64, 32]`` log-mel spectrograms in 8 x 8 patches) learns one-second sound-world clips
(:mod:`train.data.sounds`) against their captions ("two short loud high tones fading out",
"a long low hiss then three short mid buzzes"). The clips are rendered once into a pool of
``--sound-pool`` training clips (the synthesis costs more than the tiny model's step), each
turned into its spectrogram by ``fmm.audio`` at :data:`train.recipes._ssl.SOUND_MEL`, the
front end of the MAE and data2vec audio runs; batches are drawn from the pool. No training
clip sounds a held-out (pitch, timbre) pair.

Evaluation is zero-shot classification by prompts on fresh one-sound clips of every class
(``--eval-per-class`` each, held-out pairs included): each of the 12 (pitch, timbre)
classes ("high tone", "low hiss") is the mean embedding of the sound world's prompt
templates around its name ("a {}", "the sound of a {}", ..., the captions' own words, see
:func:`train.data.sounds.prompt_templates`), the class whose embedding is nearest a clip's
is its prediction (:func:`train.evaluate.class_embeddings`, as the image CLIP's zero-shot).
``metrics.json`` has the top-1 over the classes (``zero_shot_top1``), split into the seen
and the held-out combinations, and the accuracy of the predicted class's pitch and timbre
alone; ``zero_shot.png`` shows a fresh clip of every class with the class ranked first,
``confusion.png`` the confusion matrix.

``--data PATH`` trains on a user's audio clips with captions instead (any audio-pairs
format of :mod:`train.data.formats.audio`: a CSV/JSONL of paths and captions, or a folder
with a caption file per clip): a byte-level BPE trained on its captions, one-second windows
at 16 kHz decoded in the loader's workers (:mod:`train.data.audio`), the same spectrogram;
the evaluation is then the sound world's zero-shot with the sound world's prompts, which
reads a meaningful figure only if the user's captions speak of pitches and timbres.
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial

import matplotlib
import torch

from models import clip
from train.checkpoint import atomic_write
from train.data import WordTokenizer, sounds
from train.data.audio import AudioSamples
from train.data.flags import add_data_arguments, loader_source, open_data
from train.data.pipeline import Captions, training_captions
from train.data.tokenizers import BPETokenizer
from train.evaluate import class_embeddings
from train.loop import Defaults, Evaluation, Job, Recipe, SeededSource
from train.plots_generation import save_image_grid
from train.recipes import number
from train.recipes._ssl import SOUND_MEL, SOUND_SECONDS, spectrograms
from train.recipes.mae import as_pictures  # spectrograms drawn as the MAE's figure draws them

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sound-pool", type=number(at_least=2), default=4096,
        help="training clips rendered once, with their captions; batches are drawn from "
        "them (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-per-class", type=number(at_least=1), default=40,
        help="held-out clips per (pitch, timbre) class for the zero-shot (default: %(default)s)",
    )  # fmt: skip
    add_data_arguments(parser, wants=("audio-pairs",))


def captioned_pool(
    world: sounds.SoundWorldConfig, tokenizer, context: int, clips: int, *, seed: int,
    chunk: int = 256,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """``clips`` training clips of ``world`` rendered once: ``images [clips, 1, frames,
    mels]`` (their :data:`SOUND_MEL` spectrograms, CLIP's image field) and ``tokens [clips,
    context]`` (their captions).

    Example: ``captioned_pool(SoundWorldConfig(seconds=1.0), tok, 20, 64, seed=0)``.
    """
    g = torch.Generator().manual_seed(seed)
    images, tokens = [], []
    for start in range(0, clips, chunk):
        batch = sounds.sample_sounds(world, min(chunk, clips - start), generator=g)
        images.append(spectrograms(batch.waves, SOUND_MEL))
        tokens.append(tokenizer.encode(batch.captions, context))
    return {"images": torch.cat(images), "tokens": torch.cat(tokens)}


def pool_batch(pool: dict, generator: torch.Generator, batch_size: int) -> dict:
    """``batch_size`` rows of ``pool`` drawn uniformly (with replacement) by ``generator``."""
    rows = torch.randint(len(pool["tokens"]), (batch_size,), generator=generator)
    return {name: column[rows] for name, column in pool.items()}


def _spectrogram_batch(batch: dict) -> dict:
    """A loader batch of users' clips, ``audio [B, samples]``, as CLIP's ``images``."""
    return {"images": spectrograms(batch["audio"], SOUND_MEL), "tokens": batch["tokens"]}


def data_job(args: argparse.Namespace, table, world: sounds.SoundWorldConfig) -> Job:
    """``clap_tiny`` on ``--data`` (audio clips with captions): a BPE tokenizer trained on
    its captions, one-second windows at the sound world's rate."""
    tokenizer = BPETokenizer.train(training_captions(table), vocab_size=args.vocab_size)
    cfg = clip.clap_tiny(vocab_size=tokenizer.vocab_size)
    text = Captions(tokenizer, cfg.context_length)
    samples = AudioSamples(
        table, text, rate=world.sample_rate, seconds=world.seconds, seed=args.seed
    )
    return Job(
        cfg=cfg,
        source=loader_source(args, samples, finish=_spectrogram_batch),
        config={"data": str(args.data), "modality": "audio", "mel": dataclasses.asdict(SOUND_MEL)},
        files={"tokenizer.json": tokenizer.to_json()},
        describe=f"clap_tiny on {args.data} ({len(table):,} clips, BPE of "
        f"{tokenizer.vocab_size:,} ids)",
        context=(world, tokenizer),
    )


def prepare(args: argparse.Namespace, device: torch.device) -> Job:
    world = sounds.SoundWorldConfig(seconds=SOUND_SECONDS)
    table = open_data(args, wants="audio-pairs", recipe="clap")
    if table is not None:
        return data_job(args, table, world)
    tokenizer = WordTokenizer(sounds.vocabulary(world))
    cfg = clip.clap_tiny(vocab_size=tokenizer.vocab_size)
    # The pool's seed differs from the stream's, which draws its rows.
    pool = captioned_pool(world, tokenizer, cfg.context_length, args.sound_pool, seed=args.seed + 4)
    rows, cols = cfg.image_tower.grid_shape
    return Job(
        cfg=cfg,
        source=SeededSource(partial(pool_batch, pool), batch_size=args.batch_size, seed=args.seed),
        config={
            "modality": "audio",
            "world": dataclasses.asdict(world),
            "mel": dataclasses.asdict(SOUND_MEL),
        },
        files={"tokenizer.json": tokenizer.to_json()},
        describe=f"clap_tiny ({rows}x{cols} spectrogram patches, {args.sound_pool} clips)",
        context=(world, tokenizer),
    )


@torch.no_grad()
def zero_shot(params, cfg: clip.CLIPConfig, tokenizer, world, images, device) -> torch.Tensor:
    """The predicted class ``[N]`` of each spectrogram of ``images [N, 1, frames, mels]``:
    the nearest of the prompt-ensembled class embeddings (label order of
    :func:`train.data.sounds.class_names`)."""
    classes = class_embeddings(
        lambda texts: clip.encode_text(
            params, tokenizer.encode(texts, cfg.context_length).to(device), cfg=cfg
        ),
        sounds.class_names(world),
        sounds.prompt_templates(),
    )
    picked = [
        (clip.encode_image(params, x.to(device), cfg=cfg) @ classes.T).argmax(-1).cpu()
        for x in images.split(256)
    ]
    return torch.cat(picked)


def _share(hits: torch.Tensor) -> float | None:
    return round(hits.float().mean().item(), 4) if hits.numel() else None


def zero_shot_metrics(world, picked: torch.Tensor, clips: sounds.Sounds) -> dict:
    """Top-1 over the classes and of the predicted pitch and timbre, over every clip and
    split by whether its (pitch, timbre) pair was held out of training."""
    n_timbres = len(world.timbres)
    hits = {
        "": picked == clips.labels,
        "_pitch": picked // n_timbres == clips.pitch,
        "_timbre": picked % n_timbres == clips.timbre,
    }
    unseen = sounds.is_holdout(world, clips.labels)
    metrics = {}
    for name, hit in hits.items():
        metrics[f"zero_shot{name}_top1"] = _share(hit)
        metrics[f"zero_shot{name}_top1_seen_combos"] = _share(hit[~unseen])
        metrics[f"zero_shot{name}_top1_unseen_combos"] = _share(hit[unseen])
    metrics["zero_shot_classes"] = len(sounds.class_names(world))
    metrics["eval_clips"] = len(picked)
    return metrics


def confusion_figure(names: list[str], unseen: list[bool], labels, picked, title: str):
    """``write(path)``: the share of each class's clips (rows) given each class (columns);
    held-out classes' names in red."""
    n = len(names)
    counts = torch.zeros(n, n).index_put_(
        (labels, picked), torch.ones(len(labels)), accumulate=True
    )
    shares = counts / counts.sum(1, keepdim=True).clamp_min(1)

    def write(path) -> None:
        fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=110)
        image = ax.imshow(shares.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            for tick, held in zip(ticks, unseen):
                tick.set_color("red" if held else "black")
        for r in range(n):
            for c in range(n):
                if shares[r, c] >= 0.005:
                    ax.text(c, r, f"{shares[r, c]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if shares[r, c] < 0.6 else "black")  # fmt: skip
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class (red: held out of training)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)

    return write


def evaluate(job: Job, params, model_state, args: argparse.Namespace, device) -> Evaluation:
    world, tokenizer = job.context
    clips = sounds.eval_set(world, args.eval_per_class, seed=args.seed + 1)
    images = spectrograms(clips.waves, SOUND_MEL)
    picked = zero_shot(params, job.cfg, tokenizer, world, images, device)
    metrics = zero_shot_metrics(world, picked, clips)
    names = sounds.class_names(world)
    held = sounds.is_holdout(world, torch.arange(len(names))).tolist()
    firsts = torch.arange(0, len(picked), args.eval_per_class)  # one clip per class
    label = lambda i: (
        f"{names[clips.labels[i]]}{' (held out)' if held[clips.labels[i]] else ''}: "
        f"'a {names[picked[i]]}'"
    )
    strips = partial(
        save_image_grid, as_pictures(images[firsts], "audio"), columns=1,
        row_labels=[label(i) for i in firsts.tolist()],
        title=f"one clip per class, the prompt ranked first\n(top-1 "
        f"{metrics['zero_shot_top1']:.3f} of {len(names)})",
    )  # fmt: skip
    confusion = confusion_figure(
        names, held, clips.labels, picked,
        f"zero-shot confusion on {len(picked)} fresh one-sound clips (top-1 "
        f"{metrics['zero_shot_top1']:.3f}, held-out pairs "
        f"{metrics['zero_shot_top1_unseen_combos']:.3f})",
    )  # fmt: skip
    return Evaluation(
        metrics=metrics,
        headline=("zero_shot_top1", "zero_shot_top1_seen_combos",
                  "zero_shot_top1_unseen_combos", "final_loss", "train_seconds"),
        title=f"CLAP on the sound world: zero-shot top-1 {metrics['zero_shot_top1']:.3f}",
        plots={"zero_shot.png": strips, "confusion.png": confusion},
    )  # fmt: skip


RECIPE = Recipe(
    name="clap",
    help="train a tiny CLAP (CLIP with an audio tower) on the sound world, zero-shot "
    "classify held-out sounds by prompts",
    family=clip.FAMILY,
    defaults=Defaults(
        steps=400, batch_size=64, lr=1e-3, weight_decay=0.1, warmup=50, min_batch_size=2
    ),
    prepare=prepare,
    evaluate=evaluate,
    extra_arguments=_arguments,
)
