"""Saved chat sessions: one file each, replaced atomically, verified on load.

A session is ``sessions/<name>.safetensors``: the conversation's KV state as an
mlx-lm prompt cache whose metadata holds the record (turns, the token ids the
state holds, the tokens still to feed, the prefix it grew from), a SHA-256 of
those ids and a checksum of the tensors. One file means a save is one atomic,
durable rename: a crash at any point leaves the old session or the new one.

On load, the state is used only if it is exactly what the record says: the
checksum holds, the ids hash matches, the ids continue the current prefix, the
turns re-render to those ids, and the state holds that many tokens. Otherwise
the state is rebuilt from the turns with a warning; an answer never comes from
another conversation's state.

Two chats in one session (two processes, or two sessions of one name in a
process): a save happens under a file lock and only replaces the file the chat
loaded or saved last (its *revision*, a digest of what it holds). If another chat
saved the session meanwhile, the save is refused with a one-line error and
nothing on disk changes; the conversation can be saved under another name.

Sessions saved by urial-edge 0.1 (a ``sessions/<name>/`` directory) are read
too: their turns are kept and their state rebuilt.
"""

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from filelock import Timeout

from ..disk.files import file_lock, remove_stale_temporaries
from ..disk.paths import sessions_dir
from ..distributed import world as distributed
from ..errors import UrialError
from ..log import warn
from . import kv_file, validate
from .kv_file import tokens_digest

FORMAT = 2
MAX_NAME = 100  # bytes of UTF-8: the file name and its temporary's must fit in 255
LOCK_WAIT = 30.0  # seconds a save waits for another process's save of the same session


@dataclass
class SessionRecord:
    """What a saved session holds besides its KV state."""

    name: str
    turns: List[Tuple[str, str]]
    ids: List[int]  # token ids in the state (prefix included)
    pending: List[int]  # canonical tokens of the last turn(s) not yet in the state
    prefix_key: str
    model: str = ""
    prompt: str = ""


def check_name(name) -> str:
    """A session name that is safe as a file name, or a one-line error."""
    validate.text(name, "a session name")
    if not name or len(name.encode("utf-8")) > MAX_NAME or name.startswith(".") or \
            not all(ch.isalnum() or ch in "-_." for ch in name):
        raise UrialError(f"invalid session name {name[:40]!r}: use letters, digits, '-', '_' and '.' (not "
                         f"starting with '.'), up to {MAX_NAME} bytes")
    return name


def revision(record: SessionRecord) -> str:
    """A digest of what a session holds (not which rank's prefix state it grew from, so every rank of a
    split model has the same): what a chat loaded or saved, to tell whether another saved since."""
    held = {k: v for k, v in record.__dict__.items() if k != "prefix_key"}
    return hashlib.sha256(json.dumps(held, sort_keys=True).encode()).hexdigest()


def _saved_revision(path: Path, name: str) -> Optional[str]:
    """The revision of the session file at ``path``: None if there is none, "" if it cannot be read
    (a damaged file holds nothing to lose)."""
    if not path.exists():
        return None
    try:
        return revision(_record(json.loads(kv_file.header_metadata(path)["session"]), name))
    except (KeyError, TypeError, ValueError, UrialError):
        return ""


def session_path(name: str, shard: Optional[dict] = None) -> Path:
    """The session's file; each rank of a split model keeps its own part under ``.shards``."""
    if shard:
        folder = sessions_dir() / ".shards" / f"{shard['size']}-{shard['mode']}" / f"rank{shard['rank']}"
        return folder / f"{check_name(name)}.safetensors"
    return sessions_dir() / f"{check_name(name)}.safetensors"


def save(record: SessionRecord, state: list, replaces: Optional[str], shard: Optional[dict] = None) -> Path:
    """Write the session atomically and durably, if the file there is still the one of revision ``replaces``
    (None: there is none); returns its file. Another process saving the same session waits its turn."""
    path = session_path(record.name, shard)
    meta = {"format": FORMAT, "session": json.dumps(record.__dict__), "ids_sha256": tokens_digest(record.ids),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        with file_lock(path.with_suffix(".lock"), timeout=LOCK_WAIT):
            if _saved_revision(path, record.name) not in (replaces, ""):
                raise UrialError(f"session {record.name!r} was saved by another chat or process (it is not the "
                                 "conversation this one loaded or saved); not saved: save it under another name")
            kv_file.save(path, state, meta)
    except Timeout:
        raise UrialError(f"session {record.name!r} is being saved by another process; not saved") from None
    remove_stale_temporaries(path.parent)  # left by writers that were killed mid-save
    return path


def _record(data: dict, name: str) -> SessionRecord:
    try:
        record = SessionRecord(
            name=name,
            turns=[(q, a) for q, a in data["turns"]],
            ids=[int(i) for i in data.get("ids", [])],
            pending=[int(i) for i in data.get("pending", [])],
            prefix_key=str(data.get("prefix_key", "")),
            model=str(data.get("model", "")),
            prompt=str(data.get("prompt", "")),
        )
    except (KeyError, TypeError, ValueError):
        raise UrialError(f"session {name!r} is damaged (its record is not a session)") from None
    try:
        for q, a in record.turns:
            validate.text(q, "a query")
            validate.text(a, "an answer")
    except UrialError:
        raise UrialError(f"session {name!r} is damaged (its turns are not text)") from None
    return record


Found = Tuple[SessionRecord, Optional[list], Optional[str]]


def load(name: str, shard: Optional[dict] = None) -> Optional[Found]:
    """The saved record, its KV state (None if the state cannot be trusted) and the file's revision (None
    for a 0.1 session, which has no file of this format yet); None if there is no session.

    The state is checked against the record here (checksum, ids hash, length);
    the caller checks that it continues the current prefix and turns and fits the model.
    """
    path = session_path(name, shard)
    legacy = sessions_dir() / name / "session.json"
    if not path.exists():
        if legacy.is_file() and not shard:
            return _load_legacy(legacy, name), None, None
        return None
    try:
        state, meta = kv_file.load(path)
    except ValueError:  # damaged tensors: the turns may still be in the header
        state, meta = None, kv_file.header_metadata(path)
    try:
        data = json.loads(meta["session"])
        record = _record(data, name)
    except (KeyError, TypeError, ValueError):
        raise UrialError(f"session {name!r} is damaged ({path})") from None
    if data.get("name") != name:
        warn(f"session file {path.name} holds the conversation saved as {str(data.get('name'))[:40]!r} "
             "(a file copied over another?); resuming that conversation")
    if state is None:
        warn(f"session {name!r}: its KV state is damaged; rebuilding it from its turns")
    elif meta.get("ids_sha256") != tokens_digest(record.ids) or state[0].offset != len(record.ids):
        warn(f"session {name!r}: its KV state does not hold the tokens its record names; rebuilding it")
        state = None
    return record, state, revision(record)


def _load_legacy(path: Path, name: str) -> SessionRecord:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UrialError(f"session {name!r} is damaged ({path})") from None
    if not isinstance(data, dict):
        raise UrialError(f"session {name!r} is damaged ({path})")
    return _record(data, name)


def remove_legacy(name: str) -> None:
    """Delete a 0.1 session directory once its session has been saved in the current format."""
    folder = sessions_dir() / name
    if (folder / "session.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)


def list_sessions() -> List[str]:
    folder = sessions_dir()
    if not folder.is_dir():
        return []
    names = {p.stem for p in folder.glob("*.safetensors") if not p.name.startswith(".")}
    names |= {p.parent.name for p in folder.glob("*/session.json")}
    return sorted(names)


def agree_on_session(found: Optional[Found]) -> Optional[Found]:
    """Under ``mlx.launch``: rank 0's saved session on every rank. A rank keeps its own state only if its
    record is the same conversation (else its state is None and all ranks rebuild; its own file, whatever
    it holds, is the one its next save replaces)."""
    if not distributed.active():
        return found
    mine = distributed.plain(found[0].__dict__) if found else None
    leader = distributed.broadcast(mine)
    if leader is None:
        return None
    if mine is not None and {**mine, "prefix_key": ""} == {**leader, "prefix_key": ""}:
        return found
    warn(f"session {leader['name']!r}: this rank's copy is missing or differs from rank 0's; rebuilding it")
    return SessionRecord(**{**leader, "turns": [tuple(t) for t in leader["turns"]]}), None, found and found[2]
