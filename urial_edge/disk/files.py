"""Crash-safe, durable writes, and the cross-process lock.

Every file urial-edge writes goes through :func:`atomic_file`: the data goes to
a temporary file in the same directory, which is flushed to disk (fsync), renamed
over the target, and then the directory entry is flushed too. At every instant a
reader finds either the old complete file or the new one, even across a power
loss. Temporary files are named ``.<target>.<random>.tmp`` (plus a suffix some
writers need) so that listings skip them and ``cache clear`` can remove leftovers.
"""

import contextlib
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ..errors import UrialError, describe_os_error
from .paths import ensure_dir

TMP_MARK = ".tmp"
STALE_TMP_SECONDS = 600  # a writer that has not touched its temporary file for this long is gone
FULL_BELOW = 1 << 20  # a filesystem with less free space than this, after a failed write, is full


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def is_temporary(path: Path) -> bool:
    """A temporary file of :func:`atomic_file` (possibly left by a killed writer)."""
    return path.name.startswith(".") and TMP_MARK in path.name


@contextlib.contextmanager
def atomic_file(target: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success make it ``target``, durably.

    ``suffix`` is appended to the temporary name for writers that insist on an
    extension (``mx.save_safetensors`` adds ``.safetensors`` otherwise).
    """
    ensure_dir(target.parent)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_MARK + suffix, dir=target.parent)
    except OSError as e:
        raise UrialError(describe_os_error(e, target)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes files only their owner can read
        fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UrialError(describe_os_error(e, target)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def failed_write(path: Path, detail: str) -> OSError:
    """The OSError for a write that a library reported otherwise (MLX raises RuntimeError with no errno):
    "no space left" when the filesystem is all but full, else the library's own words."""
    try:
        full = shutil.disk_usage(path.parent).free < FULL_BELOW
    except OSError:
        full = False
    return OSError(errno.ENOSPC, "No space left on device") if full else OSError(errno.EIO, detail)


def write_bytes_atomic(target: Path, data: bytes) -> None:
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: Path, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target``.

    Used for model directories, which are rebuilt from their source if a crash
    between the two renames leaves none. On any failure the temporary directory
    is removed.
    """
    ensure_dir(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_MARK, dir=target.parent))
    except OSError as e:
        raise UrialError(describe_os_error(e, target.parent)) from None
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        for f in tmp.iterdir():
            fsync_file(f)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{os.getpid()}.old{TMP_MARK}")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UrialError(describe_os_error(e, target)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: Path, older_than: float = STALE_TMP_SECONDS) -> int:
    """Delete temporary files (and directories) in ``folder`` untouched for ``older_than`` seconds."""
    removed = 0
    now = time.time()
    for f in folder.iterdir() if folder.is_dir() else []:
        if not is_temporary(f):
            continue
        try:
            if now - f.stat().st_mtime < older_than:
                continue
            shutil.rmtree(f) if f.is_dir() else f.unlink()
            removed += 1
        except OSError:
            continue
    return removed


def file_lock(path: Path, timeout: float = -1):
    """A cross-process lock (``filelock``: fcntl on POSIX, msvcrt on Windows) at ``path``."""
    from filelock import FileLock

    ensure_dir(path.parent)
    return FileLock(str(path), timeout=timeout)


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
