"""Atomic writes: a reader (or the next run after a crash) sees the previous file or the new one,
never half of one.

A file is written under a temporary name in its own folder, flushed to disk, then renamed over
the target (`os.replace` is atomic on one file system). Any failure removes the temporary file and
leaves the previous one as it was. The temporary file is created with `os.open(..., 0o666)`, which
applies the process umask exactly as `open()` does, so a finished file gets the usual permissions
(0o666 & ~umask) without reading or changing the umask: `os.umask` can only be read by setting
it, and setting it, even briefly, changes it for every thread of a host that imports this package.

Temporary names are `.<name>.<pid>.<random>.tmp` and are created with `O_EXCL`, so concurrent
writers never share one. A killed process can leave one behind (hidden, never the target);
in a run directory `imagen.reference.checkpoint.clean_partial` removes them. Only the standard
library: `imagen/` is installed with the runtime.
"""

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh hidden name beside `path`: `.<name>.<pid>.<random>.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_save(path: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """Calls `save(tmp)` to write the whole file at `tmp` (a new, empty file beside `path`), then
    syncs it and renames it to `path`. `save` gets a path so that writers that only take file
    names (safetensors' `save_file`) work as well as PIL's `Image.save` or `Path.write_bytes`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies, as for open()
    try:
        save(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes `data` (str as UTF-8) to `path` atomically."""
    payload = data.encode() if isinstance(data, str) else bytes(data)
    atomic_save(path, lambda tmp: tmp.write_bytes(payload))


def atomic_save_folder(path: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """Calls `save(staging)` to fill a new, empty folder beside `path`, then renames it to `path`.
    An existing `path` is first moved aside (to a `.tmp` name) and removed last; any failure
    before the new folder is in place puts it back. A folder cannot be swapped in one rename, so
    a process killed between the two renames leaves the previous folder under its `.tmp` name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_path(path)
    os.mkdir(staging)  # 0o777 & ~umask, like any new folder
    aside = None
    try:
        save(staging)
        if path.exists():
            aside = temporary_path(path)
            os.replace(path, aside)
        os.replace(staging, path)
    except BaseException:
        if aside is not None and not path.exists():
            os.replace(aside, path)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)  # the new folder is in place; a leftover is only disk space
    _fsync_folder(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY)  # Windows flushes only handles open for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Makes a rename durable (POSIX). Windows cannot open a folder for fsync, and some file systems
    (network, FUSE) refuse it; the rename has happened either way."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
