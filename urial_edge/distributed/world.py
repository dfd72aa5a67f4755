"""This process's place in a group of processes (ranks) started by ``mlx.launch``.

    mlx.launch --hosts 10.0.0.1,10.0.0.2 --backend ring -- urial-edge serve -m MODEL

``mx.distributed`` joins the group (ring over TCP or Thunderbolt, JACCL over
RDMA, MPI). Every rank must run the same forward passes on the same batches,
or the collectives inside a split model mismatch and hang, so:

- rank 0 alone reads input (standard input, a batch file) and hands it to all
  ranks (:func:`leader_input`); every rank seeds its random stream alike, so
  sampling agrees too;
- stored states are per rank, and are used only when every rank's own copy is
  valid, else all ranks rebuild together (:func:`all_ranks_have`);
- rank 0 alone prints (:func:`quiet_followers`).

Splitting the model is ``sharding.py``; serving in lock-step is ``lockstep.py``.
Outside a launcher this is a group of one and every helper is a no-op.
"""

import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from ..errors import UrialError, one_line
from ..log import warn

# what a launcher sets in each process's environment, and the backend it means
LAUNCH_ENV = (("MLX_IBV_DEVICES", "jaccl"), ("MLX_HOSTFILE", "ring"), ("OMPI_COMM_WORLD_SIZE", "mpi"),
              ("PMI_SIZE", "mpi"), ("NCCL_HOST_IP", "nccl"))
RANK_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class World(NamedTuple):
    """This process's place in the distributed group (rank 0 of 1 when not launched)."""

    rank: int = 0
    size: int = 1
    backend: Optional[str] = None
    group: Any = None


_WORLD: Optional[World] = None


def launched_backend() -> Optional[str]:
    """The backend a launcher set this process up for; None when started alone."""
    return next((backend for var, backend in LAUNCH_ENV if os.environ.get(var)), None)


def world() -> World:
    """This process's group, joined on first use."""
    global _WORLD
    if _WORLD is None:
        _WORLD = _join(launched_backend())
    return _WORLD


def _join(backend: Optional[str]) -> World:
    if backend is None or (backend == "ring" and _ring_of_one()):
        return World()
    import mlx.core as mx

    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise UrialError(f"cannot join the MLX distributed group ({backend}): {one_line(e)}") from None
    joined = World(group.rank(), group.size(), backend, group)
    if joined.size > 1:
        # one random stream on every rank, so that sampling without a seed agrees
        seed = _broadcast(joined, int.from_bytes(os.urandom(4), "little") if joined.rank == 0 else None)
        mx.random.seed(seed)
    return joined


def _ring_of_one() -> bool:
    """A ring hostfile with fewer than two hosts (``mlx.launch -n 1`` writes an empty one): one process."""
    try:
        hosts = json.loads(_read(os.environ["MLX_HOSTFILE"]).strip() or "[]")
    except ValueError:
        return False  # MLX reports what is wrong with it
    return isinstance(hosts, list) and len(hosts) < 2


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def active() -> bool:
    """True when this process is one of several ranks."""
    return world().size > 1


def is_leader() -> bool:
    """True on rank 0 (and in a single process): the rank that reads input, prints, serves and writes."""
    return world().rank == 0


def describe() -> str:
    """The group in one line, for ``urial-edge doctor``."""
    w = world()
    if w.backend is None:
        return "one process (start under mlx.launch to split a model over several)"
    return f"rank {w.rank} of {w.size} ({w.backend} backend)"


# -- talking to the other ranks ------------------------------------------------------------------


def _all_sum(w: World, values, dtype):
    """Element-wise sum over all ranks, as numpy (on the default stream, in order with the model's)."""
    import mlx.core as mx
    import numpy as np

    try:
        return np.array(mx.distributed.all_sum(mx.array(values, dtype=dtype), group=w.group))
    except RuntimeError as e:
        raise UrialError(f"lost the connection to the other ranks ({one_line(e)})") from None


def _broadcast(w: World, value: Any) -> Any:
    """Rank 0's JSON ``value`` on every rank (the others pass None): its size, then its bytes."""
    import mlx.core as mx
    import numpy as np

    data = json.dumps(value).encode() if w.rank == 0 and value is not None else b""
    size = int(_all_sum(w, [len(data)], mx.int32)[0])
    if size == 0:
        return None
    buffer = np.frombuffer(data, dtype=np.uint8) if w.rank == 0 else np.zeros(size, dtype=np.uint8)
    return json.loads(_all_sum(w, buffer, mx.uint8).tobytes())


def broadcast(value: Any = None) -> Any:
    """Rank 0's JSON value, handed to every rank (``value`` is ignored on the others)."""
    w = world()
    return value if w.size == 1 else _broadcast(w, value)


def all_ranks_have(valid: bool, what: str) -> bool:
    """True if ``valid`` holds on every rank; else every rank rebuilds ``what`` (never a mix of shards).

    A rank whose own copy was fine says why it rebuilds anyway.
    """
    import mlx.core as mx

    w = world()
    if w.size == 1:
        return valid
    agreed = int(_all_sum(w, [0 if valid else 1], mx.int32)[0]) == 0
    if valid and not agreed:
        warn(f"{what}: another rank's part is missing or damaged; every rank rebuilds its own")
    return agreed


def plain(value: Any) -> Any:
    """``value`` as it comes out of a JSON round trip (tuples become lists), as every rank receives it."""
    return json.loads(json.dumps(value))


def leader_input(read: Callable[[], Any]) -> Any:
    """``read()`` on rank 0 (a JSON value), handed to every rank; its UrialError is raised on every rank."""
    w = world()
    if w.size == 1:
        return read()
    message = None
    if w.rank == 0:
        try:
            message = {"value": read()}
        except UrialError as e:
            message = {"error": str(e)}
    message = _broadcast(w, message)
    if "error" in message:
        raise UrialError(message["error"])
    return message["value"]


def leader_stdin(read: Callable[[], str]) -> str:
    """All of standard input, read by rank 0. mlx.launch forwards input but never its end: refused there."""
    if active() and os.environ.get("MLX_RANK") is not None:
        raise UrialError("under mlx.launch standard input never ends: pass the query as an argument")
    return leader_input(read)


# -- output -------------------------------------------------------------------------------------------


class _RankNotes(io.RawIOBase):
    """Standard error of a rank other than 0: only its warnings and errors, marked with the rank."""

    MARKS = (b"warning:", b"error:")

    def __init__(self, stream, rank: str):
        self.stream, self.rank, self.partial = stream, rank, b""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        lines = (self.partial + bytes(data)).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            at = min((i for i in (line.find(m) for m in self.MARKS) if i >= 0), default=-1)
            if at >= 0:
                self.stream.write(b"[rank " + self.rank.encode() + b"] " + line[at:] + b"\n")
                self.stream.flush()
        return len(data)


def quiet_followers() -> None:
    """Rank 0 alone prints: on the other ranks standard output is dropped and standard error keeps only
    warnings and errors. Reads the rank from the launcher's environment (no MLX import)."""
    rank = next((os.environ[v] for v in RANK_ENV if os.environ.get(v)), "0")
    if rank == "0" or launched_backend() is None:
        return
    sys.stdout = open(os.devnull, "w")
    sys.stderr = io.TextIOWrapper(_RankNotes(sys.__stderr__.buffer, rank), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
