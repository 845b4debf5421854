"""File I/O the models and the training machinery share: durable writes that follow the
user's umask (:mod:`fmm.io.atomic`), and weights files read without running code
(:mod:`fmm.io.weights`, :mod:`fmm.io.torchscript`). Nothing in the pure layers imports it."""

from fmm.io.atomic import atomic_write, file_mode, fsync_dir, is_temp_file, umask, write_synced
from fmm.io.weights import read_state_dict

__all__ = [
    "atomic_write",
    "file_mode",
    "fsync_dir",
    "is_temp_file",
    "read_state_dict",
    "umask",
    "write_synced",
]
