"""Resumable results files: one JSON object per line, each with an ``id``.

``urial-edge batch`` and ``urial-edge eval`` append a line per finished item and
flush it to disk before the next, so a run that is interrupted (Ctrl-C, a
crash, a power cut) keeps everything it wrote; the next run reads what is
there, cuts off a partial last line, and does only what is missing.
"""

import json
import os
from pathlib import Path
from typing import Dict, Iterable, Sequence

from ..errors import UrialError, describe_os_error
from ..progress import progress_bar


def read_results(path: Path) -> Dict[object, dict]:
    """The lines already in ``path`` by id ({} if there is none); a partial last line is cut off first."""
    if path.is_dir():
        raise UrialError(f"cannot write to {path}: it is a directory")
    if not path.parent.is_dir():
        raise UrialError(f"cannot write to {path}: its directory does not exist")
    if not path.exists():
        return {}
    try:
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(path, "r+b") as f:
                f.truncate(keep)
            data = data[:keep]
    except OSError as e:
        raise UrialError(f"cannot use {path}: {e.strerror}") from None
    found = {}
    for line in data.splitlines():
        try:
            record = json.loads(line)
            found[record["id"]] = record
        except (ValueError, KeyError, TypeError):
            raise UrialError(f"{path} has a line that is not a result of ours; use another output file") from None
    return found


def append_results(path: Path, ids: Sequence, records: Iterable[dict], label: str = "answering") -> None:
    """Append ``{"id": id, **record}`` per record as it comes, each flushed to disk before the next."""
    progress = progress_bar(label)
    progress(0, len(ids))
    try:
        f = open(path, "a", encoding="utf-8")
    except OSError as e:
        raise UrialError(describe_os_error(e, path)) from None
    with f:
        for k, (item_id, record) in enumerate(zip(ids, records), 1):
            f.write(json.dumps({"id": item_id, **record}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            progress(k, len(ids))
