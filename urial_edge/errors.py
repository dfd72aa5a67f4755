"""The one error type users see, and helpers that fold failures into one line."""

import errno
from pathlib import Path


class UrialError(Exception):
    """An error with a one-line message meant for the user (no traceback)."""


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line (its type name if it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def describe_os_error(e: OSError, path: Path) -> str:
    """A one-line explanation of a filesystem failure."""
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {path}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write to {path}: permission denied or read-only filesystem"
    if e.errno == errno.ENAMETOOLONG:
        return f"cannot write to {path}: the name is too long"
    if e.errno == errno.EISDIR:
        return f"cannot write to {path}: it is a directory"
    if e.errno == errno.ENOENT:
        return f"cannot write to {path}: its directory does not exist"
    return f"cannot write to {path}: {e.strerror or e}"
