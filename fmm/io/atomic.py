"""Files written durably: a crash mid-write leaves the previous version, never half a file.

Every file gets the mode ``open()`` would give it, ``0o666`` less the process umask, so a
run one account writes is readable by another (or by a serving user) as far as the umask
allows; folders are made with ``mkdir``, which applies the umask too.

Example::

    atomic_write("runs/clip/notes.txt", lambda tmp: Path(tmp).write_text("hello"))
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

# mkstemp's names: the prefix and suffix below around 8 characters of [a-z0-9_]; and the
# names safetensors' writer (Rust's tempfile crate) stages a file under, in the same folder.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$|^\.tmp[A-Za-z0-9]{6}$")


@functools.cache
def umask() -> int:
    """The process umask, read once: from ``/proc/self/status`` where Linux has it (reading
    it there changes nothing), else by setting it and setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # os.umask can only be read by replacing it; a file another thread creates in between
    # gets the stricter 0o077, never a looser mode.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits a new file gets: ``0o666 & ~umask`` (``0o644`` under umask 022)."""
    return 0o666 & ~umask()


def is_temp_file(name: str) -> bool:
    """Whether a file name is a temporary name a crash can leave: :func:`atomic_write`'s, or
    the ``.tmpXXXXXX`` that safetensors writes through before renaming."""
    return bool(_TEMP_NAME.match(name))


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the names created, renamed or removed in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(path)``, give the file :func:`file_mode` and flush it to disk."""
    write(str(path))
    # Writers differ (mkstemp and safetensors make 0600 files): the umask decides, as for open().
    os.chmod(path, file_mode())
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` over ``path`` (same folder, fsynced);
    the file gets :func:`file_mode`, as one ``open()`` creates would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_synced(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
