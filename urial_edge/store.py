"""Where urial-edge keeps things on disk, and how it writes them safely.

Layout under ``$URIAL_EDGE_HOME`` (default ``~/.cache/urial-edge``)::

    models/<name>/      MLX model directories (config, safetensors, tokenizer)
    cache/<key>.safetensors   prefix KV caches, named by their content key
    sessions/<name>/    saved chat sessions
    servers/<key>.json  records of running ``urial-edge serve`` processes
    tokenizers/         vocabulary indexes and remembered prefix token ids
"""

import contextlib
import errno
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional


class UrialError(Exception):
    """An error with a one-line message meant for the user (no traceback)."""


def home() -> Path:
    env = os.environ.get("URIAL_EDGE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "urial-edge"


def models_dir() -> Path:
    return home() / "models"


def cache_dir() -> Path:
    return home() / "cache"


def sessions_dir() -> Path:
    return home() / "sessions"


def servers_dir() -> Path:
    return home() / "servers"


def describe_os_error(e: OSError, path: Path) -> str:
    """A one-line explanation of a filesystem failure."""
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {path}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write to {path}: permission denied or read-only filesystem"
    return f"cannot write to {path}: {e.strerror or e}"


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UrialError(describe_os_error(e, path)) from None
    return path


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it into place on success.

    On any failure the temporary directory is removed, so ``target`` is either
    complete or absent.
    """
    ensure_dir(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise UrialError(describe_os_error(e, target.parent)) from None
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UrialError(describe_os_error(e, target)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` on success."""
    ensure_dir(target.parent)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UrialError(describe_os_error(e, target)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(text)


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2,
               "g": 1024**3, "gb": 1024**3, "t": 1024**4, "tb": 1024**4}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """Parse ``500M``, ``2GB``, ``1024`` into bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise UrialError(f"invalid size {text!r}: use a number with K, M, G or T (e.g. 500M)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(text: str) -> float:
    """Parse ``30s``, ``15m``, ``12h``, ``7d``, ``2w`` into seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m:
        raise UrialError(f"invalid duration {text!r}: use a number with s, m, h, d or w (e.g. 7d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


Progress = Callable[[int, int], None]


def stderr_progress(label: str) -> Progress:
    """A progress callback drawing ``label [####....] done/total`` on stderr."""
    state = {"last": 0.0}

    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - state["last"] < 0.1:
            return
        state["last"] = now
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        end = "\n" if done >= total else ""
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{label} [{bar}] {done}/{total}{end}")
        elif done >= total or done == 0:
            sys.stderr.write(f"{label} [{bar}] {done}/{total}\n")
        sys.stderr.flush()

    return update


def no_progress(done: int, total: int) -> None:
    return None


def optional_progress(progress: Optional[Progress]) -> Progress:
    return progress or no_progress


def package_data(kind: str, name: str) -> Path:
    """A shipped data file: ``prompts/...`` or ``models/...``.

    Wheels carry them inside the package (``urial_edge/data/<kind>``); a source
    checkout keeps them at the top level of the repository.
    """
    here = Path(__file__).resolve().parent
    for base in (here / "data" / kind, here.parent / kind):
        if (base / name).exists():
            return base / name
    return here / "data" / kind / name


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line (its type name if it has none)."""
    return " ".join(str(error).split()) or type(error).__name__
