"""Users' audio clips as tables (``audio-csv``, ``audio-jsonl``, ``audio-folder``,
``audio-classes``): WAV / FLAC files in the layout of :mod:`train.data.formats.clips`
(``audio_key``, ``audio_caption_key``, ``audio_label_key`` of ``open_table`` for a CSV's
columns). Clips are decoded by :func:`train.data.audio.decode_audio`.

Example::

    table = open_table("sounds/train.csv")      # audio,caption,label rows: audio-csv
    table.kind, table.texts(0), table.clip_file(0)
"""

from __future__ import annotations

from train.data.formats.clips import Media

# What soundfile (libsndfile) reads that a folder scan counts as a clip.
AUDIO = Media("audio", (".wav", ".flac"), noun="audio clips", bare="audio")
