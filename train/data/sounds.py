"""Sound world: seeded, synthesised sounds with captions, the audio twin of the shapes world.

A sound has a pitch (low / mid / high), a timbre (a sine tone, a square-wave buzz, a hiss
of band-passed noise around the pitch, a chirp sweeping up by half an octave), a rhythm
(one long, two short, three short, steady), a loudness envelope (growing louder, fading
out, flat) and a loudness (quiet, loud). Captions read "two short high tones", "a steady
loud low buzz fading out"; with probability ``p_sequence`` a training clip is two sounds,
one in each half, captioned "three short mid hisses then a long low tone". A sound's class
is its (pitch, timbre) pair, "high tone": the classes a zero-shot audio classifier is asked
for; the pairs in ``SoundWorldConfig.holdout`` never sound in a training clip, so zero-shot
accuracy on them in :func:`eval_set` measures compositional generalisation.

Waveforms are ``[batch, samples]`` float32 mono in ``[-1, 1]`` at ``sample_rate``
(16 kHz), ``seconds`` long; everything is vectorised over the batch (one tensor per
burst slot, a few harmonics) and deterministic from a ``torch.Generator`` / seed:

    cfg = SoundWorldConfig(seconds=2.0)
    sounds = next(sound_stream(cfg, 16, seed=0))   # sounds.waves [16, 32000]
    spec = fmm.audio.log_mel(sounds.waves, AUDIOMAE)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from train.data.shapes import _check_names, _uniform

# Pitch -> the range its base frequency is drawn from (Hz). A chirp ends 1.5x higher, so
# even then the ranges stay apart: 260 * 1.5 < 450 and 650 * 1.5 < 1100.
PITCH_HZ: dict[str, tuple[float, float]] = {
    "low": (180.0, 260.0),
    "mid": (450.0, 650.0),
    "high": (1100.0, 1600.0),
}
# Timbre -> (noun, plural noun) in captions.
TIMBRES: dict[str, tuple[str, str]] = {
    "sine": ("tone", "tones"),
    "square": ("buzz", "buzzes"),
    "noise": ("hiss", "hisses"),
    "chirp": ("chirp", "chirps"),
}
# Rhythm -> (caption words, bursts as (start, end) fractions of the sound's span).
RHYTHMS: dict[str, tuple[str, tuple[tuple[float, float], ...]]] = {
    "one long": ("a long", ((0.1, 0.9),)),
    "two short": ("two short", ((0.15, 0.35), (0.65, 0.85))),
    "three short": ("three short", ((0.08, 0.24), (0.42, 0.58), (0.76, 0.92))),
    "steady": ("a steady", ((0.0, 1.0),)),
}
# Envelope -> (caption words, gain at the start and at the end of the sound's span).
ENVELOPES: dict[str, tuple[str, tuple[float, float]]] = {
    "rising": ("growing louder", (0.25, 1.0)),
    "falling": ("fading out", (1.0, 0.25)),
    "flat": ("", (1.0, 1.0)),
}
LOUDNESS: dict[str, tuple[float, float]] = {"quiet": (0.12, 0.2), "loud": (0.5, 0.7)}

_MAX_BURSTS = max(len(b) for _, b in RHYTHMS.values())
_RAMP_S = 0.005  # burst on/off ramps: no clicks
_JITTER = 0.02  # bursts shift by up to this fraction of the span
_HARMONICS = (1, 3, 5, 7, 9)  # a square wave's odd harmonics, those below Nyquist kept
_NOISE_OCTAVES = 0.3  # a hiss's band: a Gaussian in log-frequency, this std in octaves
_FLOOR = 0.002  # std of the background noise every clip has
_TEMPLATES = ("a {}", "the sound of a {}", "a recording of a {}", "a long {}", "a steady {}")
_PREFIXES = ("", "the sound of ", "a recording of ")


@dataclass(frozen=True, kw_only=True)
class SoundWorldConfig:
    """Clips of ``seconds`` at ``sample_rate``; holdout: (pitch, timbre) pairs kept out of train.

    Example: `SoundWorldConfig(seconds=1.0, holdout=(("high", "square"),))`.
    """

    sample_rate: int = 16000
    seconds: float = 2.0
    pitches: tuple[str, ...] = tuple(PITCH_HZ)
    timbres: tuple[str, ...] = tuple(TIMBRES)
    holdout: tuple[tuple[str, str], ...] = (("high", "square"), ("low", "noise"), ("mid", "chirp"))
    p_sequence: float = 0.3  # share of training clips that are two sounds, one per half
    p_no_loudness: float = 0.5  # share of captions without "quiet" / "loud"

    def __post_init__(self) -> None:
        if not isinstance(self.sample_rate, int) or self.sample_rate < 8000:
            raise ValueError(f"sample_rate must be an int >= 8000, got {self.sample_rate!r}")
        if not 0.25 <= self.seconds <= 60:
            raise ValueError(f"seconds must be in [0.25, 60], got {self.seconds!r}")
        _check_names("pitches", self.pitches, PITCH_HZ)
        _check_names("timbres", self.timbres, TIMBRES)
        for pair in self.holdout:
            if len(pair) != 2 or pair[0] not in self.pitches or pair[1] not in self.timbres:
                raise ValueError(
                    f"holdout entry {pair!r} must be a (pitch, timbre) pair drawn from "
                    f"pitches={self.pitches} and timbres={self.timbres}"
                )
        if len(set(self.holdout)) >= len(self.pitches) * len(self.timbres):
            raise ValueError("holdout covers every pitch/timbre combination; none left to train")
        for name in ("p_sequence", "p_no_loudness"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")

    @property
    def samples(self) -> int:
        """Samples per clip: ``round(seconds * sample_rate)``."""
        return round(self.seconds * self.sample_rate)


@dataclass(frozen=True)
class Sounds:
    """A batch of clips: waves [batch, samples] float32 in [-1, 1] and batch captions.

    labels [batch] int64: the (first) sound's class, ``pitch * len(timbres) + timbre`` (see
    :func:`class_names`); pitch / timbre / rhythm / envelope / loudness [batch] int64 index
    cfg.pitches, cfg.timbres, tuple(RHYTHMS), tuple(ENVELOPES), tuple(LOUDNESS) for that
    sound; second [batch] int64: the class of the clip's second sound, -1 when it has one.
    """

    waves: torch.Tensor
    captions: list[str]
    labels: torch.Tensor
    pitch: torch.Tensor
    timbre: torch.Tensor
    rhythm: torch.Tensor
    envelope: torch.Tensor
    loudness: torch.Tensor
    second: torch.Tensor


@dataclass(frozen=True)
class _Parts:
    """Sounds to render, one row each: attribute indices [N] and their span [N] in seconds."""

    clip: torch.Tensor  # the clip [N] a sound belongs to
    labels: torch.Tensor
    rhythm: torch.Tensor
    envelope: torch.Tensor
    loudness: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor


def class_names(cfg: SoundWorldConfig) -> list[str]:
    """Names in label order (label = pitch_index * len(cfg.timbres) + timbre_index).

    Example: `class_names(SoundWorldConfig())[:2] == ["low tone", "low buzz"]`.
    """
    return [f"{p} {TIMBRES[t][0]}" for p in cfg.pitches for t in cfg.timbres]


def is_holdout(cfg: SoundWorldConfig, labels: torch.Tensor) -> torch.Tensor:
    """Bool mask [N] of labels [N] (int64 class ids) that are held-out combinations.

    Example: `is_holdout(cfg, sounds.labels).float().mean()`.
    """
    n_timbres = len(cfg.timbres)
    held = [cfg.pitches.index(p) * n_timbres + cfg.timbres.index(t) for p, t in cfg.holdout]
    return torch.isin(labels, torch.tensor(held, dtype=torch.int64, device=labels.device))


def prompt_templates() -> tuple[str, ...]:
    """Zero-shot prompt templates, each with one "{}" slot for a class name.

    Example: `[t.format("high tone") for t in prompt_templates()]`.
    """
    return _TEMPLATES


def vocabulary(cfg: SoundWorldConfig) -> list[str]:
    """Every word that captions and prompt templates can produce, sorted.

    Example: `WordTokenizer(vocabulary(cfg))`.
    """
    phrases = [
        *_PREFIXES,
        *cfg.pitches,
        *LOUDNESS,
        "then",
        *(t.replace("{}", " ") for t in _TEMPLATES),
    ]
    phrases += [w for t in cfg.timbres for w in TIMBRES[t]]
    phrases += [words for words, _ in (*RHYTHMS.values(), *ENVELOPES.values())]
    return sorted({w for p in phrases for w in p.split()})


def _table(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _bursts(parts: _Parts, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Burst starts and ends [N, _MAX_BURSTS] in seconds; unused slots are empty (end < start)."""
    spans = [b + ((-1.0, -2.0),) * (_MAX_BURSTS - len(b)) for _, b in RHYTHMS.values()]
    slots = _table(spans)[parts.rhythm]  # [N, slots, 2] fractions of the span
    length = (parts.end - parts.start)[:, None]
    shift = _uniform((parts.clip.shape[0], 1), -_JITTER, _JITTER, g)
    steady = _table([b == ((0.0, 1.0),) for _, b in RHYTHMS.values()], torch.bool)[parts.rhythm]
    shift = torch.where(steady[:, None], 0.0, shift)  # a steady sound fills its span
    start = parts.start[:, None] + (slots[..., 0] + shift) * length
    end = parts.start[:, None] + (slots[..., 1] + shift) * length
    return start, end


def _carrier(timbre_name: str, f0, tau, duration, rate: int, g) -> torch.Tensor:
    """Unit-peak carrier [n, S] of one timbre: f0 [n, 1] Hz; tau [n, S] seconds since the
    current burst began, duration [n, S] that burst's length."""
    if timbre_name == "sine":
        return torch.sin(2 * math.pi * f0 * tau)
    if timbre_name == "chirp":
        # Frequency f0 * (1 + 0.5 * tau / duration): the phase is its integral.
        return torch.sin(2 * math.pi * f0 * (tau + 0.25 * tau * tau / duration))
    if timbre_name == "square":
        wave = torch.zeros_like(tau)
        for k in _HARMONICS:
            # Band-limited: a harmonic at or past Nyquist would alias back down.
            keep = (k * f0 < rate / 2).float() / k
            wave += keep * torch.sin(2 * math.pi * k * f0 * tau)
        return wave * (math.pi / 4) / 1.1  # the partial sum's overshoot kept under 1
    # A hiss: white noise band-passed around f0 (Gaussian in log-frequency), one noise per
    # sound shared by its bursts, scaled to a peak-like level of 2.5 standard deviations.
    samples = tau.shape[1]
    spectrum = torch.fft.rfft(torch.randn(tau.shape, generator=g))
    freqs = torch.fft.rfftfreq(samples, d=1 / rate)
    octaves = torch.log2(freqs.clamp(min=1.0)[None] / f0)
    band = torch.exp(-0.5 * (octaves / _NOISE_OCTAVES) ** 2)
    noise = torch.fft.irfft(spectrum * band, n=samples)
    return noise / (2.5 * noise.std(dim=1, keepdim=True))


def _render(cfg: SoundWorldConfig, parts: _Parts, batch: int, g: torch.Generator) -> torch.Tensor:
    """Sums every part's sound into its clip: [batch, samples], with a faint noise floor."""
    samples = cfg.samples
    t = torch.arange(samples, dtype=torch.float32) / cfg.sample_rate
    n_timbres = len(cfg.timbres)
    pitch, timbre = parts.labels // n_timbres, parts.labels % n_timbres
    low, high = _table([PITCH_HZ[p] for p in cfg.pitches])[pitch].unbind(1)
    f0 = (low + (high - low) * torch.rand(low.shape, generator=g))[:, None]
    start, end = _bursts(parts, g)
    since = t[None, None] - start[..., None]  # [N, slots, S]
    # Each burst ramps on and off over _RAMP_S; empty slots (end < start) stay silent. Bursts
    # never overlap, so a sum over slots is the one burst sounding (if any) at each sample.
    gate = (since / _RAMP_S).clamp(0, 1) * ((end[..., None] - t) / _RAMP_S).clamp(0, 1)
    inside = (since >= 0) & (t < end[..., None])
    tau = (since * inside).sum(dim=1)
    duration = ((end - start).clamp(min=_RAMP_S)[..., None] * inside).sum(dim=1).clamp(min=_RAMP_S)
    gate = gate.sum(dim=1)
    carrier = torch.zeros_like(tau)
    for index, name in enumerate(cfg.timbres):
        rows = (timbre == index).nonzero()[:, 0]
        if rows.numel():
            carrier[rows] = _carrier(name, f0[rows], tau[rows], duration[rows], cfg.sample_rate, g)
    gains = _table([gain for _, gain in ENVELOPES.values()])[parts.envelope]  # [N, 2]
    progress = ((t - parts.start[:, None]) / (parts.end - parts.start)[:, None]).clamp(0, 1)
    envelope = torch.lerp(gains[:, :1], gains[:, 1:], progress)
    levels = _table(list(LOUDNESS.values()))[parts.loudness]
    level = levels[:, 0] + (levels[:, 1] - levels[:, 0]) * torch.rand(levels.shape[0], generator=g)
    waves = _FLOOR * torch.randn(batch, samples, generator=g)
    waves.index_add_(0, parts.clip, gate * carrier * envelope * level[:, None])
    return waves.clamp_(-1, 1)


def _phrase(cfg: SoundWorldConfig, label: int, rhythm: int, envelope: int, loud: int | None) -> str:
    words, _ = list(RHYTHMS.values())[rhythm]
    singular, plural = TIMBRES[cfg.timbres[label % len(cfg.timbres)]]
    noun = plural if words in ("two short", "three short") else singular
    loudness = f"{tuple(LOUDNESS)[loud]} " if loud is not None else ""
    change = list(ENVELOPES.values())[envelope][0]
    pitch = cfg.pitches[label // len(cfg.timbres)]
    return f"{words} {loudness}{pitch} {noun}" + (f" {change}" if change else "")


def _captions(cfg: SoundWorldConfig, parts: _Parts, batch: int, g: torch.Generator) -> list[str]:
    named = (torch.rand(parts.clip.shape[0], generator=g) >= cfg.p_no_loudness).tolist()
    prefixes = torch.randint(len(_PREFIXES), (batch,), generator=g).tolist()
    phrases: list[list[str]] = [[] for _ in range(batch)]
    rows = (parts.clip, parts.labels, parts.rhythm, parts.envelope, parts.loudness)
    for (clip, label, rhythm, envelope, loud), with_loudness in zip(
        zip(*(x.tolist() for x in rows)), named
    ):
        phrases[clip].append(_phrase(cfg, label, rhythm, envelope, loud if with_loudness else None))
    return [_PREFIXES[p] + " then ".join(ph) for p, ph in zip(prefixes, phrases)]


def _draw_attributes(n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.randint(len(table), (n,), generator=g) for table in (RHYTHMS, ENVELOPES, LOUDNESS)
    )


def _make(cfg: SoundWorldConfig, first: torch.Tensor, second: torch.Tensor, g) -> Sounds:
    """Renders clips whose first sound has class first [B] and second sound second [B] (-1:
    none, the first sound then spans the clip)."""
    batch, seconds = first.shape[0], cfg.seconds
    two = second >= 0
    clips = torch.arange(batch)
    clip = torch.cat([clips, clips[two]])
    labels = torch.cat([first, second[two]])
    half = torch.where(two, seconds / 2, seconds)
    start = torch.cat([torch.zeros(batch), torch.full((int(two.sum()),), seconds / 2)])
    end = torch.cat([half, torch.full((int(two.sum()),), seconds)])
    rhythm, envelope, loudness = _draw_attributes(clip.shape[0], g)
    parts = _Parts(clip, labels, rhythm, envelope, loudness, start, end)
    waves = _render(cfg, parts, batch, g)
    captions = _captions(cfg, parts, batch, g)
    n_timbres = len(cfg.timbres)
    return Sounds(
        waves, captions, first, first // n_timbres, first % n_timbres,
        rhythm[:batch], envelope[:batch], loudness[:batch], second,
    )  # fmt: skip


def sample_sounds(
    cfg: SoundWorldConfig, batch_size: int, *, generator: torch.Generator, split: str = "train"
) -> Sounds:
    """Renders batch_size clips: waves [batch, samples] with captions.

    split="train" never sounds a held-out (pitch, timbre) pair and makes a clip of two sounds
    with probability cfg.p_sequence; split="eval" has one sound per clip, its class uniform
    over all pairs. Rhythm, envelope and loudness are uniform in both.

    Example: `sample_sounds(SoundWorldConfig(), 32, generator=torch.Generator().manual_seed(0))`.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    classes = torch.arange(len(cfg.pitches) * len(cfg.timbres))
    if split == "eval":
        first = classes[torch.randint(len(classes), (batch_size,), generator=generator)]
        return _make(cfg, first, torch.full_like(first, -1), generator)
    allowed = classes[~is_holdout(cfg, classes)]
    first, second = allowed[torch.randint(len(allowed), (2, batch_size), generator=generator)]
    two = torch.rand(batch_size, generator=generator) < cfg.p_sequence
    return _make(cfg, first, torch.where(two, second, -1), generator)


def eval_set(cfg: SoundWorldConfig, n_per_class: int, *, seed: int) -> Sounds:
    """One-sound clips of every class n_per_class times, in label order, held-out included.

    Example: `s = eval_set(SoundWorldConfig(), 8, seed=1); held = is_holdout(cfg, s.labels)`.
    """
    if not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class must be a positive int, got {n_per_class!r}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(cfg.pitches) * len(cfg.timbres)).repeat_interleave(n_per_class)
    return _make(cfg, labels, torch.full_like(labels, -1), g)


def sound_stream(
    cfg: SoundWorldConfig, batch_size: int, *, seed: int, split: str = "train"
) -> Iterator[Sounds]:
    """An endless stream of `Sounds` batches, deterministic from seed.

    Example: `sounds = next(sound_stream(SoundWorldConfig(), 16, seed=0))`.
    """
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield sample_sounds(cfg, batch_size, generator=generator, split=split)
