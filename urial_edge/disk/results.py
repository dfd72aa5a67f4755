"""Resumable results files: one JSON object per line, each with an ``id``.

``urial-edge batch`` and ``urial-edge eval`` append a line per finished item and
flush it to disk before the next, so a run that is interrupted (Ctrl-C, a
crash, a power cut) keeps everything it wrote; the next run reads what is
there, cuts off a partial last line, and does only what is missing.

A file is touched only once it is known to be ours: every complete line must be
a result, and a partial last line must be the start of one, before anything is
cut; a file that is also the input is refused.
"""

import json
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence

from ..errors import UrialError, describe_os_error
from ..progress import progress_bar

OUR_LINE = b'{"id": '  # how every line we write begins (json.dumps of a dict whose first key is "id")


def read_results(path: Path, source: Optional[Path] = None) -> Dict[object, dict]:
    """The lines already in ``path`` by id ({} if there is none); a partial last line of ours is cut off
    (only after the whole file was found to be ours). ``source``, the input, may not be the same file."""
    if path.is_dir():
        raise UrialError(f"cannot write to {path}: it is a directory")
    if not path.parent.is_dir():
        raise UrialError(f"cannot write to {path}: its directory does not exist")
    if not path.exists():
        return {}
    if source is not None and _same_file(source, path):
        raise UrialError(f"{path} is the input file; write the answers to another file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UrialError(f"cannot use {path}: {e.strerror}") from None
    complete, _, partial = data.rpartition(b"\n") if not data.endswith(b"\n") else (data, b"", b"")
    found = {}
    for line in complete.splitlines():
        try:
            record = json.loads(line)
            found[record["id"]] = record
        except (ValueError, KeyError, TypeError, RecursionError):
            raise UrialError(f"{path} has a line that is not a result of ours; use another output file") from None
    if partial and not partial.startswith(OUR_LINE):
        raise UrialError(f"{path} has a last line that is not a result of ours; use another output file")
    if partial:
        _cut(path, len(data) - len(partial))
    return found


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (symbolic and hard links too: the same device and inode)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _cut(path: Path, size: int) -> None:
    try:
        with open(path, "r+b") as f:
            f.truncate(size)
    except OSError as e:
        raise UrialError(f"cannot use {path}: {e.strerror}") from None


def other_setup(records: Dict[object, dict], expected: Callable[[dict], Optional[dict]]) -> Optional[dict]:
    """The first record made with another setup than ``expected(record)`` (None: any will do), a dict of the
    record's keys that must match: its generation ``options`` and its ``constraint`` (a digest, None for
    none). Resuming with another setup would mix two in one file."""
    for record in records.values():
        wanted = expected(record)
        if wanted is not None and any(record.get(key) != value for key, value in wanted.items()):
            return record
    return None


def append_results(path: Path, ids: Sequence, records: Iterable[dict], label: str = "answering") -> None:
    """Append ``{"id": id, **record}`` per record as it comes, each flushed to disk before the next.
    A write that fails (a full disk) is a one-line error; the lines before it stay."""
    progress = progress_bar(label)
    progress(0, len(ids))
    try:
        with open(path, "a", encoding="utf-8") as f:
            for k, (item_id, record) in enumerate(zip(ids, records), 1):
                f.write(json.dumps({"id": item_id, **record}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                progress(k, len(ids))
    except OSError as e:
        raise UrialError(describe_os_error(e, path)) from None
