"""Users' video clips as tables (``video-csv``, ``video-jsonl``, ``video-folder``,
``video-classes``): the layout of :mod:`train.data.formats.clips` with ``--video-key``,
``--video-caption-key``, ``--video-label-key`` for a CSV's columns. Clips are decoded by
:func:`train.data.videos.decode_video`.

Example::

    table = open_table("clips/train.csv")      # video,caption rows: sniffed as video-csv
    table.kind, table.texts(0), table.clip_file(0)
"""

from __future__ import annotations

from train.data.formats.clips import Media

# Suffix -> the one FFmpeg demuxer that may read it (train.data.videos forces it).
VIDEO_DEMUXERS = {
    ".mp4": "mov", ".m4v": "mov", ".mov": "mov", ".mkv": "matroska", ".webm": "matroska",
    ".avi": "avi", ".mpg": "mpeg", ".mpeg": "mpeg", ".ts": "mpegts", ".ogv": "ogg",
}  # fmt: skip
VIDEO = Media("video", tuple(VIDEO_DEMUXERS), noun="videos", bare="videos", key_flag="--video-key")
