"""Decoding users' video files: ``frames`` frames of a clip at ``size x size``, bounded work.

:func:`decode_video` opens a file with PyAV, checks it from the container header before any
frame is decoded (the file's bytes, the stream's width and height, its frame count and
duration, each against a limit), picks frame indices by a :class:`Sampling` and decodes up
to the last one it needs, resizing and center-cropping each kept frame as
:func:`train.data.images.eval_transform` does an image (the same
:func:`~train.data.images.resize_shorter` and :func:`~train.data.images.center_crop`).
The result is ``uint8 [3, frames, size, size]``, channels first like the built-in clips of
:mod:`train.data.video_shapes` (one clip of their ``[batch, 3, T, H, W]``). Anything
unusable is one :class:`train.data.images.BadSample` naming the file, for the loader to
skip and count.

Sampling: ``uniform`` spreads ``frames`` indices evenly from the first frame to the last
(a clip shorter than ``frames`` repeats frames, as a slowed-down clip would);
``stride=k`` takes every ``k``-th frame from a start, drawn per sample in training (a clip
shorter than the span repeats its last frame: short clips are kept, not refused).

Only the demuxer the file's suffix names is ever run (:data:`train.data.formats.videos.VIDEO_DEMUXERS`: an ``.mp4``
is parsed as MP4 and nothing else), so a playlist or concat script named ``clip.mp4``
fails to parse rather than making FFmpeg open other files or URLs; FFmpeg's decoders are
the only code that reads the file.

Measured here (CPU torch 2.14.1, Python 3.11): ``torchcodec`` 0.17 installs (``pip install
--no-deps``) and imports, but its first ``VideoDecoder`` fails with "Could not load
libtorchcodec": it links the system's FFmpeg 4..9 (``OSError: libavutil.so.56`` ..
``libavutil.so.61: cannot open shared object file``) and the machine has none. PyAV 18.1
ships its own FFmpeg 8 in its wheel and decodes, so the data extra uses PyAV.

Example::

    video = decode_video(Path("clips/dog.mp4"), where="dog.mp4", frames=8, size=64,
                         sampling=Sampling.parse("stride=2"))   # uint8 [3, 8, 64, 64]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.data.formats.table import require
from train.data.formats.videos import VIDEO, VIDEO_DEMUXERS
from train.data.images import BadSample, center_crop, file_within, resize_shorter
from train.data.pipeline import Samples, derived_seed

MAX_BYTES = 1 << 30  # 1 GiB: well past a minute of 1080p, far short of a worker's memory
MAX_SIDE = 4096  # pixels a side (DCI 4K); a larger stream is a bomb more often than footage
MAX_FRAMES = 18_000  # ten minutes at 30 fps: uniform sampling decodes every frame
MAX_SECONDS = 600.0


@dataclass(frozen=True)
class Sampling:
    """Which frames a clip gives: ``stride=None`` uniform over the clip, else every
    ``stride``-th frame from a start.

    Example: ``Sampling.parse("stride=4").indices(100, 8, start=0.5)`` ->
    ``[36, 40, ..., 64]``.
    """

    stride: int | None = None

    @classmethod
    def parse(cls, text: str) -> Sampling:
        """``"uniform"`` or ``"stride=K"`` (K >= 1), as ``--frame-sampling`` takes it."""
        if text == "uniform":
            return cls()
        name, _, value = text.partition("=")
        if name == "stride" and value.isdigit() and int(value) >= 1:
            return cls(int(value))
        raise ValueError(f"--frame-sampling must be 'uniform' or 'stride=K' (K >= 1), got {text!r}")

    def __str__(self) -> str:
        return "uniform" if self.stride is None else f"stride={self.stride}"

    def indices(self, available: int, frames: int, *, start: float = 0.0) -> list[int]:
        """``frames`` frame indices into a clip of ``available`` frames. ``start`` in
        ``[0, 1)``: where a stride window begins, as a fraction of the places it can begin
        (uniform ignores it). Indices past the clip's end are its last frame."""
        if available < 1 or frames < 1:
            raise ValueError(f"indices of {frames} frames in {available}: both must be >= 1")
        if self.stride is None:
            # (available - 1) * k / (frames - 1), rounded half up: first and last included.
            if frames == 1:
                return [0]
            return [
                (2 * (available - 1) * k + frames - 1) // (2 * (frames - 1)) for k in range(frames)
            ]
        span = (frames - 1) * self.stride + 1
        first = min(int(start * max(1, available - span + 1)), max(0, available - span))
        return [min(first + k * self.stride, available - 1) for k in range(frames)]


def decode_video(
    path: str | Path,
    *,
    where: str,
    frames: int,
    size: int,
    sampling: Sampling = Sampling(),
    start: float = 0.0,
    max_bytes: int = MAX_BYTES,
    max_side: int = MAX_SIDE,
    max_frames: int = MAX_FRAMES,
    max_seconds: float = MAX_SECONDS,
) -> torch.Tensor:
    """The video file at ``path`` -> ``uint8 [3, frames, size, size]``, or :class:`BadSample`.

    ``sampling`` / ``start``: see :meth:`Sampling.indices`. The limits are checked before
    decoding: ``max_bytes`` (the file), ``max_side`` (the stream's width and height),
    ``max_frames`` and ``max_seconds`` (the header's frame count and duration; a stream
    that decodes more frames than ``max_frames`` is refused too, whatever its header said).
    Each error names ``where`` and the limit.
    """
    av = require("av", format="video")
    path = Path(path)
    demuxer = VIDEO_DEMUXERS.get(path.suffix.lower())
    if demuxer is None:
        raise BadSample(where, f"not a video file name (one of {', '.join(VIDEO.suffixes)})")
    file_within(path, where=where, max_bytes=max_bytes, noun="video")
    try:
        with av.open(str(path), format=demuxer, metadata_errors="ignore") as container:
            available = _check_header(container, where, max_side, max_frames, max_seconds)
            picks = sampling.indices(available, frames, start=start)
            kept = _decode(container, set(picks), max(picks), where, max_frames, size)
    except BadSample:
        raise
    except Exception as e:  # FFmpeg's failures on broken bytes are no contract: all skip
        raise BadSample(where, f"cannot decode the video ({type(e).__name__}: {e})") from None
    if not kept:
        raise BadSample(where, "no frame decodes")
    last = max(kept)  # a header that promised more frames than decode: repeat the last one
    video = np.stack([kept[min(i, last)] for i in picks])  # [T, size, size, 3]
    return torch.from_numpy(video).permute(3, 0, 1, 2).contiguous()


def _check_header(container, where: str, max_side: int, max_frames: int, max_seconds: float):
    """The first video stream's frame count (from the header, else its packets counted
    without decoding), after the size, frame and duration limits."""
    if not container.streams.video:
        raise BadSample(where, "no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width > max_side or height > max_side:
        raise BadSample(where, f"{width}x{height} is more than the limit of {max_side} a side")
    if width < 1 or height < 1:
        raise BadSample(where, f"a zero-size video ({width}x{height})")
    seconds = _seconds(container, stream)
    if seconds > max_seconds:
        raise BadSample(where, f"{seconds:.1f} s is more than the limit of {max_seconds} s")
    available = stream.frames
    if available <= 0:
        available = sum(1 for p in container.demux(stream) if p.size)
        container.seek(0)
    if available > max_frames:
        raise BadSample(where, f"{available} frames is more than the limit of {max_frames}")
    if available < 1:
        raise BadSample(where, "no video frames")
    return available


def _seconds(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration is not None else 0.0


def _decode(container, picks: set[int], last: int, where: str, max_frames: int, size: int):
    """``{index: uint8 [size, size, 3]}`` of the frames in ``picks``, decoding frames in
    order up to ``last``."""
    kept = {}
    stream = container.streams.video[0]
    for index, frame in enumerate(container.decode(stream)):
        if index >= max_frames:
            raise BadSample(where, f"decodes more than the limit of {max_frames} frames")
        if index in picks:
            image = center_crop(resize_shorter(frame.to_image(), size), size)
            kept[index] = np.asarray(image.convert("RGB"))
        if index >= last:
            break
    return kept


# codec -> (pixel format, options) of a lossless or near-lossless encoding. libx264 at
# qp 0 in 4:4:4 is lossless in YUV: decoded RGB is within 2 of the frames written (the
# colour conversion's rounding; 4:2:0 at crf 0 was 44 off on 4 px colour blocks, measured);
# ffv1 in RGB (bgr0, for .mkv) is exact.
_ENCODINGS = {"libx264": ("yuv444p", {"qp": "0"}), "ffv1": ("bgr0", {})}


def write_video(path: str | Path, video: torch.Tensor, *, fps: int = 8, codec: str = "libx264"):
    """Write ``video`` (``uint8 [3, T, H, W]``, :func:`decode_video`'s layout) to ``path``
    (``.mp4`` for ``libx264``, ``.mkv`` for ``ffv1``), losslessly (see ``_ENCODINGS``).

    Example: ``write_video("clip.mp4", (clips.videos[0] * 255).round().byte())``.
    """
    av = require("av", format="video")
    if codec not in _ENCODINGS:
        raise ValueError(f"codec must be one of {', '.join(_ENCODINGS)}, got {codec!r}")
    if video.dtype != torch.uint8 or video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be uint8 [3, T, H, W], got {video.dtype} {list(video.shape)}")
    pix_fmt, options = _ENCODINGS[codec]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = video.shape[3], video.shape[2]
        stream.pix_fmt, stream.options = pix_fmt, options
        for rgb in video.permute(1, 2, 3, 0).numpy():
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            container.mux(stream.encode(frame.reformat(format=pix_fmt)))
        container.mux(stream.encode())


class VideoSamples(Samples):
    """Sample ``(epoch, i)`` of a video table (:mod:`train.data.formats.videos`):
    ``videos [3, frames, size, size] float32`` in ``[0, 1]`` and the fields of
    ``fields(table, i, generator)`` (:class:`train.data.pipeline.Captions`,
    :class:`train.data.pipeline.Labels`, or ``None`` for clips alone). A stride window's start is drawn from
    the sample's generator, seeded by ``(seed, epoch, i)``: a resumed run sees the frames
    the uninterrupted one did. Bad files are skipped and counted by
    :class:`train.data.pipeline.LoaderSource` as bad images are.

    Example: ``VideoSamples(table, None, frames=8, size=32, sampling=Sampling(), seed=0)``.
    """

    def __init__(
        self,
        table,
        fields: Callable[[Any, int, torch.Generator], dict[str, torch.Tensor]] | None,
        *,
        frames: int,
        size: int,
        sampling: Sampling,
        seed: int,
    ):
        self.table, self.text, self.seed = table, fields, seed
        self.frames, self.size, self.sampling = frames, size, sampling

    def sample(self, epoch: int, i: int) -> dict[str, torch.Tensor]:
        """Sample ``i`` as it is in ``epoch``, or :class:`BadSample`."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, i))
        fields = self.text(self.table, i, generator) if self.text is not None else {}
        start = float(torch.rand((), generator=generator))
        try:
            path = self.table.clip_file(i)
        except (OSError, ValueError) as e:
            raise BadSample(self.table.where(i), f"cannot read the video: {e}") from e
        video = decode_video(
            path, where=self.table.where(i), frames=self.frames, size=self.size,
            sampling=self.sampling, start=start,
        )  # fmt: skip
        return {"videos": video.float() / 255, **fields}
