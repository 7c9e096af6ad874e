"""Atomic output: a reader (or a crash) never sees half a file, and nothing a user made is
replaced until its successor is whole."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic(path: str | Path):
    """Yield a temporary path beside `path` (same suffix, so writers that infer the format
    from it work); when the block succeeds, fsync it, rename it over `path` and fsync the
    folder; when it fails, delete it. An output that cannot be written (a folder that is a
    file or read-only, a full disk) is an InputError naming it."""
    path = Path(path)
    folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as e:
        raise _unwritable(path, e) from None
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it private; the output is an ordinary file
    os.close(fd)
    try:
        yield Path(tmp)
        _sync(tmp)  # the data is on disk before the name points at it ...
        os.replace(tmp, path)
        _sync(path.parent)  # ... and the rename itself survives a power cut
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _unwritable(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def folder(path: str | Path) -> Path:
    """An output folder, made if missing; one that cannot be is an InputError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(path, e) from None
    return path


def _unwritable(path: Path, e: OSError):
    import errno

    from mfbench.errors import InputError
    if e.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a folder should be
        return InputError(e.filename or path, None, "cannot write: a file is in the way (expected a folder)")
    return InputError(path, None, f"cannot write: {e.strerror or e} (expected a writable folder with free space)")


def _sync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    with atomic(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
    return Path(path)
