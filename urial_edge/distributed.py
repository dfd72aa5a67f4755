"""One model split over several processes (ranks) started by ``mlx.launch``.

    mlx.launch --hosts 10.0.0.1,10.0.0.2 --backend ring -- urial-edge serve -m MODEL

MLX does the hard parts: ``mx.distributed`` joins the group (ring over TCP or
Thunderbolt, JACCL over RDMA, MPI), and mlx-lm's model classes split
themselves, ``model.shard(group)`` (tensor parallel: each rank holds a slice of
every layer's heads and MLP columns) or ``model.model.pipeline(group)`` (each
rank holds a run of layers). mlx-lm's ``sharded_load`` wraps the same three
steps (load lazily, split, evaluate); urial-edge runs them on its own loader
because ``sharded_load`` also builds mlx-lm's tokenizer (importing transformers,
seconds on every rank) and pipelines only checkpoints with a weight index.

What this module adds: every rank must run the same forward passes on the same
batches, or the collectives inside the split model mismatch and hang. So

- rank 0 alone reads input (standard input, a batch file) and hands it to all
  ranks (:func:`leader_input`); every rank seeds its random stream alike, so
  sampling agrees too;
- stored states are per rank (the prefix cache's key and the session's file
  name the rank, world size and mode) and are used only when every rank's own
  copy is valid, else all ranks rebuild together (:func:`all_ranks_have`);
- under ``serve``, rank 0's HTTP threads start and cancel answers at any time:
  :class:`Lockstep` turns them into messages that every rank applies to its
  engine before the same step;
- rank 0 alone prints (:func:`quiet_followers`).
"""

import io
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from .errors import UrialError, one_line

# what a launcher sets in each process's environment, and the backend it means
LAUNCH_ENV = (("MLX_IBV_DEVICES", "jaccl"), ("MLX_HOSTFILE", "ring"), ("OMPI_COMM_WORLD_SIZE", "mpi"),
              ("PMI_SIZE", "mpi"), ("NCCL_HOST_IP", "nccl"))
RANK_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
SHARDING_ENV = "URIAL_EDGE_SHARDING"  # "tensor" or "pipeline" to choose for models that have both
IDLE_TICK = 0.1  # seconds between empty lock-step messages while the server is idle
STOP_WAIT = 10.0


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
        from .log import warn

        warn(f"{what}: another rank's part is missing or damaged; every rank rebuilds its own")
    return agreed


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


# -- loading this rank's part of a model ------------------------------------------------------------


def load(spec: Optional[str]) -> Tuple[Path, Any, dict, Optional[dict]]:
    """Resolve and load a model: whole in one process, this rank's part under a launcher.

    Returns ``(path, model, config, shard)``; ``shard`` is ``{"rank", "size",
    "mode"}`` for a split model (it goes into the prefix cache's key) and None
    otherwise.
    """
    import mlx.core as mx

    from .modeling import load_model

    w = world()
    path = _resolve_in_turn(spec)
    if w.size == 1:
        return (path, *load_model(path), None)
    model, config = load_model(path, lazy=True)
    mode = split_model(model, config, w.group)
    mx.eval(model.parameters())  # reads only the weights this rank kept
    return path, model, config, {"rank": w.rank, "size": w.size, "mode": mode}


def _resolve_in_turn(spec: Optional[str]) -> Path:
    """Rank 0 resolves first (converting the model once); then the others find it in place."""
    from .models import resolve_model

    path = resolve_model(spec) if is_leader() else None
    w = world()
    if w.size > 1:
        import mlx.core as mx

        _all_sum(w, [0], mx.int32)  # a barrier: rank 0 is done
    return path or resolve_model(spec)


def split_model(model, config: dict, group) -> str:
    """Split ``model`` (weights not yet read) among ``group``'s ranks in place; returns the mode used."""
    size = group.size()
    mode = sharding_mode(model, config, size)
    try:
        if mode == "tensor":
            model.shard(group)
        else:
            model.model.pipeline(group)
    except (ValueError, AssertionError) as e:
        raise UrialError(f"cannot split model type {config.get('model_type')!r} over {size} ranks: "
                         f"{one_line(e)}") from None
    return mode


def sharding_mode(model, config: dict, size: int) -> str:
    """"tensor" where the architecture has ``shard`` and the heads divide, else "pipeline"; else a one-line error."""
    arch = config.get("model_type")
    has = {"tensor": hasattr(model, "shard"), "pipeline": hasattr(getattr(model, "model", None), "pipeline")}
    wanted = os.environ.get(SHARDING_ENV, "").strip().lower() or None
    cannot = f"model type {arch!r} cannot be split over {size} ranks"
    if wanted not in (None, "tensor", "pipeline"):
        raise UrialError(f"{SHARDING_ENV} must be 'tensor' or 'pipeline', got {wanted!r}")
    if not any(has.values()):
        raise UrialError(f"{cannot}: mlx-lm has neither tensor nor pipeline parallelism for it (architectures "
                         f"that have: {', '.join(splittable_architectures())})")
    if wanted and not has[wanted]:
        raise UrialError(f"{cannot} in {wanted} mode ({SHARDING_ENV}): mlx-lm does not have it for this architecture")
    problem = head_problem(config, size)
    if wanted == "tensor" or (wanted is None and has["tensor"] and (problem is None or not has["pipeline"])):
        if problem:
            raise UrialError(f"{cannot}: {problem}")
        return "tensor"
    layers = len(model.model.layers)
    if layers < size:
        raise UrialError(f"{cannot}: it has {layers} layers, fewer than the ranks")
    return "pipeline"


def head_problem(config: dict, size: int) -> Optional[str]:
    """Why tensor parallelism cannot split this model's attention heads evenly (None if it can)."""
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    if not isinstance(heads, int) or (heads % size == 0 and kv_heads % size == 0):
        return None
    common = math.gcd(heads, kv_heads)
    fits = [n for n in range(2, common + 1) if common % n == 0]
    hint = f"it splits over {' or '.join(map(str, fits[:4]))} ranks" if fits else "it cannot be split by heads"
    return f"its {heads} query heads and {kv_heads} key/value heads do not divide by {size} ({hint})"


def splittable_architectures() -> List[str]:
    """mlx-lm's model types with tensor or pipeline parallelism, read from its sources (no imports)."""
    import mlx_lm.models

    folder = Path(mlx_lm.models.__file__).parent
    return sorted(f.stem for f in folder.glob("*.py")
                  if any(mark in _read(str(f)) for mark in ("def shard(", "(PipelineMixin")))


# -- sessions ------------------------------------------------------------------------------------------


def agree_on_session(found: Optional[tuple]) -> Optional[tuple]:
    """Rank 0's saved session (record, state) on every rank; a rank keeps its own state only if its
    record is the same conversation (else its state is None and all ranks rebuild)."""
    from .sessions import SessionRecord

    if not active():
        return found
    mine = _plain(found[0].__dict__) if found else None
    leader = broadcast(mine)
    if leader is None:
        return None
    if mine is not None and {**mine, "prefix_key": ""} == {**leader, "prefix_key": ""}:
        return found
    from .log import warn

    warn(f"session {leader['name']!r}: this rank's copy is missing or differs from rank 0's; rebuilding it")
    return SessionRecord(**{**leader, "turns": [tuple(t) for t in leader["turns"]]}), None


def _plain(value: Any) -> Any:
    """``value`` as it comes out of a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(value))


# -- serving in lock-step ---------------------------------------------------------------------------


class Lockstep:
    """Keeps every rank's engine taking the same steps with the same batches while rank 0 serves HTTP.

    Rank 0's HTTP threads never touch the engine: :meth:`call` queues the
    arguments of ``Assistant.stream``/``complete`` and waits, and a cancelled
    answer (a client that left) is queued through the engine's ``sync`` hook.
    Before each step rank 0's engine thread broadcasts what was queued; every
    rank makes the same calls and cancellations on its own engine, then steps.
    Idle, rank 0 sends an empty message every ``IDLE_TICK`` and the others sleep
    in between (waiting inside a collective spins a core).
    """

    CALLS = ("stream", "complete")

    def __init__(self, assistant):
        self.assistant, self.engine = assistant, assistant.engine
        self.leader = is_leader()
        self.lock = threading.Condition()
        self.queued: List[Tuple[str, dict, Any]] = []  # (call, arguments, its Future)
        self.cancels: List[Any] = []
        self.futures: List[Any] = []
        self.live: Dict[int, Any] = {}  # call number -> engine sequence, the same on every rank
        self.calls = 0
        self.stopping = False
        self.driving = False
        self.stopped = threading.Event()
        self.error: Optional[UrialError] = None
        self.engine.sync = self

    # -- rank 0 ------------------------------------------------------------------------

    def call(self, kind: str, args: dict):
        """Make ``assistant.<kind>(**args)`` on every rank; returns rank 0's result (or raises its error)."""
        from concurrent.futures import Future

        future = Future()
        with self.lock:
            if self.stopped.is_set():
                raise UrialError("the server is stopping")
            self.queued.append((kind, args, future))
            self.lock.notify()
        return future.result()

    def cancel(self, sequence) -> None:
        """The engine's hook for ``Sequence.cancel``: every rank drops it before the same step."""
        with self.lock:
            self.cancels.append(sequence)
            self.lock.notify()

    def drive(self) -> None:
        """Rank 0's engine thread (``Engine.start``)."""
        self.driving = True
        try:
            while self._turn(self._take()):
                pass
        except UrialError as e:
            from .log import warn

            self.error = e
            warn(f"{e}; stopping the server")
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            with self.lock:  # no call is queued after this
                self.stopped.set()
                pending = self.futures + [future for _, _, future in self.queued]
            for future in pending:
                if not future.done():
                    future.set_exception(UrialError("the server is stopping"))

    def stop(self) -> None:
        """Tell the other ranks to end (rank 0, once its server has stopped)."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.driving:
            self.stopped.wait(STOP_WAIT)

    def _take(self) -> Optional[dict]:
        """What rank 0 has for the other ranks before the next step (waits a tick while idle)."""
        with self.lock:
            if not (self.queued or self.cancels or self.stopping or self.engine.busy()):
                self.lock.wait(IDLE_TICK)
            queued, cancels, self.queued, self.cancels = self.queued, self.cancels, [], []
            stop = self.stopping
        self.futures = [future for _, _, future in queued]
        numbers = [n for n, seq in self.live.items() if any(seq is c for c in cancels)]
        if not (queued or numbers or stop):
            return None
        return {"calls": [[kind, args] for kind, args, _ in queued], "cancel": numbers, "stop": stop}

    # -- every rank ----------------------------------------------------------------------

    def follow(self) -> None:
        """A rank other than 0: apply rank 0's messages and step, until it stops."""
        while self._turn(None):
            if not self.engine.busy():
                time.sleep(IDLE_TICK * 0.8)

    def _turn(self, message: Optional[dict]) -> bool:
        """One exchange, then one engine step on every rank; False once rank 0 stops."""
        message = broadcast(message)
        if message is not None:
            if message["stop"]:
                return False
            self._apply(message)
        if self.engine.busy():
            self.engine.run_step()
        return True

    def _apply(self, message: dict) -> None:
        for number in message["cancel"]:
            if number in self.live:
                self.live[number].cancelled = True  # the flag itself: Sequence.cancel would come back here
        for i, (kind, args) in enumerate(message["calls"]):
            try:
                if kind not in self.CALLS:
                    raise UrialError(f"unknown lock-step call {kind!r}")
                result = getattr(self.assistant, kind)(**args)
                self.live[self.calls] = result.sequence
            except Exception as e:  # the same on every rank; rank 0's HTTP thread gets it
                result = e
            self.calls += 1
            if self.leader and isinstance(result, Exception):
                self.futures[i].set_exception(result)
            elif self.leader:
                self.futures[i].set_result(result)
        self.live = {n: seq for n, seq in self.live.items() if seq.finish_reason is None}


class _Front:
    """The assistant as rank 0's HTTP server sees it: answers start through the lock-step."""

    def __init__(self, assistant, lockstep: Lockstep):
        self._assistant, self._lockstep = assistant, lockstep

    def __getattr__(self, name: str):
        return getattr(self._assistant, name)

    def stream(self, query: str, **kwargs):
        return self._lockstep.call("stream", _plain({"query": query, **kwargs}))

    def complete(self, text: str, **kwargs):
        return self._lockstep.call("complete", _plain({"text": text, **kwargs}))


@contextmanager
def serving(assistant) -> Iterator[Any]:
    """What rank 0's HTTP server should use: the assistant itself in one process, else a lock-step front
    (the other ranks run :func:`follow`); on exit the other ranks are told to stop."""
    if not active():
        yield assistant
        return
    lockstep = Lockstep(assistant)
    try:
        yield _Front(assistant, lockstep)
    finally:
        lockstep.stop()
    if lockstep.error is not None:
        raise lockstep.error


def follow(assistant) -> None:
    """A rank other than 0 under ``serve``: replay rank 0's requests on this rank's part of the model."""
    assistant.tokenizer.load_full()
    assistant.prefix  # loaded or built together with rank 0's (Assistant.start)
    Lockstep(assistant).follow()


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
