"""Decoding users' audio files: a mono waveform at the model's rate, bounded work.

:func:`decode_audio` opens a WAV or FLAC file with soundfile (libsndfile, the data extra),
checks it from its header before any sample is decoded (the file's bytes, its channel
count, sample rate and duration, each against a limit; the container must be the one its
suffix names, so a ``.wav`` that holds something else is refused), reads only the window
it needs (``seconds`` from a start drawn per sample in training, or the whole clip),
mixes the channels down to mono and resamples to ``rate`` with
:func:`fmm.audio.resample`. The result is ``float32 [samples]`` in ``[-1, 1]``, one row of
the built-in world's ``[batch, samples]`` (:mod:`train.data.sounds`); a clip shorter than
``seconds`` is padded with silence. Anything unusable is one
:class:`train.data.images.BadSample` naming the file, for the loader to skip and count.

:class:`AudioSamples` is the loop's map-style dataset over an audio table
(:mod:`train.data.formats.audio`), for :class:`train.data.pipeline.LoaderSource`.

Example::

    wave = decode_audio(Path("clips/dog.flac"), where="dog.flac", rate=16000, seconds=2.0)
    spec = fmm.audio.log_mel(wave[None], AUDIOMAE)          # [1, 1024, 128]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmm.audio import resample
from train.data.formats.table import require
from train.data.images import BadSample, file_within
from train.data.pipeline import Samples, derived_seed

MAX_BYTES = 1 << 30  # 1 GiB: over an hour of CD-quality stereo WAV
MAX_SECONDS = 3600.0  # a decoded window is at most `seconds`; this bounds the header's claims
MAX_CHANNELS = 8  # 7.1 surround; more is a multitrack session or a broken header
RATES = (1000, 384_000)  # sample rates accepted, Hz
# Suffix -> the containers libsndfile may report for it (it detects the format by content).
CONTAINERS = {".wav": ("WAV", "WAVEX", "RF64"), ".flac": ("FLAC",)}


def decode_audio(
    path: str | Path,
    *,
    where: str,
    rate: int,
    seconds: float | None = None,
    start: float = 0.0,
    max_bytes: int = MAX_BYTES,
    max_seconds: float = MAX_SECONDS,
    max_channels: int = MAX_CHANNELS,
) -> torch.Tensor:
    """The WAV/FLAC file at ``path`` -> mono ``float32 [samples]`` at ``rate``, or
    :class:`BadSample`.

    ``seconds``: the window to keep (``None``: the whole clip); it begins ``start`` (in
    ``[0, 1]``) of the way into the part of the clip it can begin in, and a shorter clip is
    padded with zeros to ``round(seconds * rate)`` samples. The limits are checked from the
    header before decoding: ``max_bytes`` (the file), ``max_channels``, ``max_seconds``
    (its duration) and the sample rate (:data:`RATES`). Each error names ``where``.
    """
    sf = require("soundfile", format="audio")
    path = Path(path)
    containers = CONTAINERS.get(path.suffix.lower())
    if containers is None:
        raise BadSample(where, f"not an audio file name (one of {', '.join(CONTAINERS)})")
    file_within(path, where=where, max_bytes=max_bytes, noun="audio")
    try:
        with sf.SoundFile(str(path)) as f:
            _check_header(f, where, containers, max_seconds, max_channels)
            window = (
                f.frames if seconds is None else min(f.frames, math.ceil(seconds * f.samplerate))
            )
            f.seek(round(start * (f.frames - window)))
            data = f.read(window, dtype="float32", always_2d=True)  # [window, channels]
            orig_rate = f.samplerate
    except BadSample:
        raise
    except Exception as e:  # libsndfile's failures on broken bytes are no contract: all skip
        raise BadSample(where, f"cannot decode the audio ({type(e).__name__}: {e})") from None
    if data.shape[0] == 0:
        raise BadSample(where, "no samples decode")
    mono = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    wave = resample(mono[None], orig_rate, rate)[0].clamp(-1, 1)
    if seconds is not None:
        wanted = round(seconds * rate)
        wave = torch.nn.functional.pad(wave[:wanted], (0, max(0, wanted - wave.shape[0])))
    return wave


def _check_header(f, where: str, containers, max_seconds: float, max_channels: int) -> None:
    if f.format not in containers:
        raise BadSample(where, f"holds {f.format} audio, not {' / '.join(containers)}")
    if not 1 <= f.channels <= max_channels:
        raise BadSample(where, f"{f.channels} channels is outside the limit of 1..{max_channels}")
    if not RATES[0] <= f.samplerate <= RATES[1]:
        raise BadSample(
            where, f"a sample rate of {f.samplerate} Hz is outside {RATES[0]}..{RATES[1]}"
        )
    duration = f.frames / f.samplerate
    if duration > max_seconds:
        raise BadSample(where, f"{duration:.1f} s is more than the limit of {max_seconds} s")


def write_audio(path: str | Path, wave: torch.Tensor, *, rate: int) -> None:
    """Writes a mono ``wave [samples]`` in ``[-1, 1]`` as 16-bit PCM, WAV or FLAC by
    ``path``'s suffix (the built-in world's clips on disk; tests' files)."""
    sf = require("soundfile", format="audio")
    suffix = Path(path).suffix.lower()
    if suffix not in CONTAINERS:
        raise ValueError(f"path must end in one of {', '.join(CONTAINERS)}, got {str(path)!r}")
    data = wave.detach().to(torch.float32).clamp(-1, 1).numpy()
    sf.write(str(path), data, rate, subtype="PCM_16", format=CONTAINERS[suffix][0])


class AudioSamples(Samples):
    """Sample ``(epoch, i)`` of an audio table (:mod:`train.data.formats.audio`):
    ``audio [round(seconds * rate)] float32`` and the fields of ``fields(table, i,
    generator)`` (:class:`train.data.pipeline.Captions`, :class:`train.data.pipeline.Labels`,
    or ``None`` for clips alone). The window's start is drawn from the sample's generator,
    seeded by ``(seed, epoch, i)``: a resumed run hears what the uninterrupted one did. Bad
    files are skipped and counted by :class:`train.data.pipeline.LoaderSource` as bad
    images are.

    Example: ``AudioSamples(table, None, rate=16000, seconds=2.0, seed=0)``.
    """

    def __init__(
        self,
        table,
        fields: Callable[[Any, int, torch.Generator], dict[str, torch.Tensor]] | None,
        *,
        rate: int,
        seconds: float,
        seed: int,
    ):
        if not isinstance(rate, int) or not RATES[0] <= rate <= RATES[1]:
            raise ValueError(f"rate must be an int in {RATES[0]}..{RATES[1]} Hz, got {rate!r}")
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds!r}")
        self.table, self.text, self.seed = table, fields, seed
        self.rate, self.seconds = rate, seconds

    def sample(self, epoch: int, i: int) -> dict[str, torch.Tensor]:
        """Sample ``i`` as it is in ``epoch``, or :class:`BadSample`."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, i))
        fields = self.text(self.table, i, generator) if self.text is not None else {}
        start = float(torch.rand((), generator=generator))
        try:
            path = self.table.clip_file(i)
        except (OSError, ValueError) as e:
            raise BadSample(self.table.where(i), f"cannot read the audio: {e}") from e
        wave = decode_audio(
            path, where=self.table.where(i), rate=self.rate, seconds=self.seconds, start=start
        )
        return {"audio": wave, **fields}
