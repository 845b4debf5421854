"""What the self-supervised recipes (``python -m train mae``, ``data2vec``) share: the
built-in data they pretrain on, the held-out probe sets, and the probe report.

Pretraining data (:func:`data_for`, :func:`training_batch`): shapes-world scenes
(``images [B, 3, 32, 32]``), sound-world clips as log-mels (``spectrograms [B, 1, 64, 32]``,
:data:`SOUND_MEL`, drawn from a :func:`sound_pool`) or shapes-world captions (``tokens [B,
16]``, data2vec only). Training data never shows a held-out (colour, shape) / (pitch,
timbre) combination.

The probes (:func:`probe_sets`, :func:`probe_report`): one attribute per task, read by
:mod:`train.probe` from a frozen encoder's features, fitted on one set and scored on a
second set drawn with another seed:

- ``<attr>_heldout``: fitted on the first set's seen combinations, scored on the second's
  held-out ones, which neither the encoder nor the probe has seen;
- ``<attr>_iid``: the same probe scored on new draws of the seen combinations;
- ``<attr>_pretrain_heldout``: fitted on every combination of the first set, scored on the
  second's held-out ones: held out of pretraining only.

The attributes (:data:`ATTRIBUTES`, the form attribute first, which is the headline): shape
and colour of a one-object scene; timbre and pitch of a one-sound clip; for text, shape
and colour of the first object a two-object caption names (see :func:`caption_probe_set`
for why).
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial
from typing import NamedTuple

import torch

from fmm.audio import MelConfig, log_mel
from train import probe
from train.data import WordTokenizer, WorldConfig, is_holdout, sample_scenes, sounds
from train.data import eval_set as scene_eval_set
from train.loop import SeededSource
from train.recipes import number

SOUND_SECONDS = 1.0
# A log-mel sized for the tiny audio presets: 25 ms frames every 15.6 ms over one second at
# 16 kHz (65 frames, cut to 64) in 32 mel bands up to Nyquist, normalised by the sound
# world's mean and std (measured over 256 training clips: -4.35, 3.18).
SOUND_MEL = MelConfig(
    sample_rate=16000, frame_length=400, hop=250, n_fft=512, mels=32, frames=64,
    mean=-4.35, std=3.18,
)  # fmt: skip
CONTEXT = 16  # token positions of a caption: the longest (two objects) is 13 words + 2
# The attributes probed, per modality: the form attribute (the headline) first.
ATTRIBUTES = {"image": ("shape", "color"), "audio": ("timbre", "pitch"), "text": ("shape", "color")}


@dataclasses.dataclass(frozen=True)
class Data:
    """What a run trains on: ``world`` (a :class:`WorldConfig` or a
    :class:`~train.data.sounds.SoundWorldConfig`); for audio its front end ``mel``; for text
    its ``tokenizer`` (the world's words; ``<unk>``, which captions never produce, is the
    mask id)."""

    modality: str
    world: WorldConfig | sounds.SoundWorldConfig
    mel: MelConfig | None = None
    tokenizer: WordTokenizer | None = None


def data_for(modality: str) -> Data:
    """The built-in world and front end of ``modality`` (``"image"``, ``"audio"``, ``"text"``)."""
    if modality == "audio":
        return Data("audio", sounds.SoundWorldConfig(seconds=SOUND_SECONDS), SOUND_MEL)
    world = WorldConfig()
    return Data(
        modality, world, tokenizer=WordTokenizer.for_world(world) if modality == "text" else None
    )


def spectrograms(waves: torch.Tensor, mel: MelConfig) -> torch.Tensor:
    """``waves [B, samples]`` -> the audio encoders' input ``[B, 1, frames, mels]``."""
    return log_mel(waves, mel)[:, None]


def sound_pool(data: Data, clips: int, *, seed: int, chunk: int = 256) -> torch.Tensor:
    """``clips`` training spectrograms ``[clips, 1, frames, mels]``, rendered once: the sound
    world's synthesis costs several times a tiny encoder's step, so audio runs draw their
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
    [B, 3, H, W]``, their captions ``tokens [B, CONTEXT]`` with ``valid`` (text), or
    ``spectrograms [B, 1, frames, mels]`` drawn from ``pool`` (the :func:`sound_pool`;
    ``None`` otherwise)."""
    if data.modality == "audio":
        return {"spectrograms": pool[torch.randint(len(pool), (batch_size,), generator=generator)]}
    scenes = sample_scenes(data.world, batch_size, generator=generator)
    if data.modality == "image":
        return {"images": scenes.images}
    tokens = data.tokenizer.encode(scenes.captions, CONTEXT)
    return {"tokens": tokens, "valid": tokens != data.tokenizer.pad_id}


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the data and the probes: ``--sound-pool``, ``--probe-per-class``,
    ``--probe-steps``."""
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


def source(data: Data, args: argparse.Namespace) -> SeededSource:
    """The run's training batches (:func:`training_batch`) from ``--seed``, ``--batch-size``
    and, for audio, a pool of ``--sound-pool`` clips (its seed differs from the stream's,
    which draws its rows)."""
    pool = None if data.mel is None else sound_pool(data, args.sound_pool, seed=args.seed + 4)
    return SeededSource(
        partial(training_batch, data, pool), batch_size=args.batch_size, seed=args.seed
    )


def run_config(data: Data) -> dict:
    """``config.json``'s entries for the data: the modality, the world, the mel front end."""
    return {
        "modality": data.modality,
        "world": dataclasses.asdict(data.world),
        **({"mel": dataclasses.asdict(data.mel)} if data.mel else {}),
    }


def caption_probe_set(
    data: Data, n_per_class: int, *, seed: int
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Two-object captions ("a large red circle left of a small blue square"), ``n_per_class
    x`` the (colour, shape) classes of them, every combination allowed: ``(tokens [N,
    CONTEXT], {"shape": ..., "color": ...}, unseen [N] bool)``, the labels the first-named
    object's shape and colour, ``unseen`` marking captions whose first object is a held-out
    combination (pretraining never showed it, in either place).

    Why this task: the caption names two colours and two shapes, so no bag of its words
    says which colour or shape is the first object's; only word order binds them. (A
    caption naming one object makes its colour and shape words the input itself: a random
    encoder's features read them at 0.99; probing a masked slot's role, the kind of word
    it held, is no better, as the prefix and the masks' count and positions give it away.)
    A random-init encoder still reads the binding well (its features mix each word with its
    position): shape at 0.83 held out, 0.91 iid at the tiny preset.
    """
    world, tok = data.world, data.tokenizer
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * len(world.colors) * len(world.shapes)
    pairs = dataclasses.replace(world, holdout=(), p_two_objects=1.0)
    scenes = sample_scenes(pairs, n, generator=g)
    attributes = {
        "shape": (scenes.shapes, len(world.shapes)),
        "color": (scenes.colors, len(world.colors)),
    }
    first = scenes.colors * len(world.shapes) + scenes.shapes
    return tok.encode(scenes.captions, CONTEXT), attributes, is_holdout(world, first)


def probe_set(
    data: Data, n_per_class: int, *, seed: int
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One object / sound of every class ``n_per_class`` times (captions:
    :func:`caption_probe_set`): ``(inputs [N,
        ...], {attribute: (labels [N], classes)}, unseen [N] bool)``, ``unseen`` marking the
        held-out combinations."""
    world = data.world
    if data.modality == "text":
        return caption_probe_set(data, n_per_class, seed=seed)
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


class ProbeSets(NamedTuple):
    """The probe's two sets as one: ``inputs [N, ...]`` (the first set's rows, then the
    second's), ``tasks`` (:func:`probe_tasks`), ``fitted [N]`` (the first set's rows),
    ``unseen [N]`` (held-out combinations)."""

    inputs: torch.Tensor
    tasks: dict[str, probe.Task]
    fitted: torch.Tensor
    unseen: torch.Tensor

    @property
    def test(self) -> slice:
        """The second set's rows of ``inputs``."""
        return slice(int(self.fitted.sum()), len(self.inputs))


def probe_sets(data: Data, n_per_class: int, *, seed: int) -> ProbeSets:
    """The first probe set drawn with ``seed + 1``, the second with ``seed + 2`` (the run's
    ``--seed``), stacked, with their tasks."""
    fit_x, fit_attrs, fit_unseen = probe_set(data, n_per_class, seed=seed + 1)
    test_x, test_attrs, test_unseen = probe_set(data, n_per_class, seed=seed + 2)
    attributes = {
        name: (torch.cat([labels, test_attrs[name][0]]), classes)
        for name, (labels, classes) in fit_attrs.items()
    }
    unseen = torch.cat([fit_unseen, test_unseen])
    fitted = torch.arange(len(fit_x) + len(test_x)) < len(fit_x)
    return ProbeSets(
        torch.cat([fit_x, test_x]), probe_tasks(attributes, unseen, fitted), fitted, unseen
    )


def probe_report(
    sets: ProbeSets,
    modality: str,
    *,
    trained: torch.Tensor,
    random_init: torch.Tensor,
    budget: probe.Budget,
) -> dict:
    """:func:`train.probe.compare` of the features ``trained`` / ``random_init [N, D]`` of
    ``sets.inputs`` on every task, the form attribute's ``_heldout`` the headline
    (``probe_accuracy``, ``probe_gain_points``), with ``probe_examples`` (how many fit the
    headline probe, how many the second set holds)."""
    metrics = probe.compare(
        sets.tasks,
        trained=trained,
        random_init=random_init,
        headline=(f"{ATTRIBUTES[modality][0]}_heldout",),
        budget=budget,
    )
    fit = int((sets.fitted & ~sets.unseen).sum())
    metrics["probe_examples"] = {"fit": fit, "test": int((~sets.fitted).sum())}
    return metrics
