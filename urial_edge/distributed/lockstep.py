"""Serving a model split over several ranks: every rank's engine takes the same steps.

Rank 0 serves HTTP; its threads start and cancel answers at any time. The
:class:`Lockstep` turns those calls into messages that every rank applies to
its own engine before the same step.
"""

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..errors import UrialError
from ..log import warn
from .world import active, broadcast, is_leader, plain

IDLE_TICK = 0.1  # seconds between empty lock-step messages while the server is idle
STOP_WAIT = 10.0


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
        self.live: Dict[int, Any] = {}  # call number -> engine generation, the same on every rank
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

    def cancel(self, generation) -> None:
        """The engine's hook for ``Generation.cancel``: every rank drops it before the same step."""
        with self.lock:
            self.cancels.append(generation)
            self.lock.notify()

    def drive(self) -> None:
        """Rank 0's engine thread (``Engine.start``)."""
        self.driving = True
        try:
            while self._turn(self._take()):
                pass
        except UrialError as e:
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
                self.live[number].cancelled = True  # the flag itself: Generation.cancel would come back here
        for i, (kind, args) in enumerate(message["calls"]):
            try:
                if kind not in self.CALLS:
                    raise UrialError(f"unknown lock-step call {kind!r}")
                result = getattr(self.assistant, kind)(**args)
                self.live[self.calls] = result.generation
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
        return self._lockstep.call("stream", plain({"query": query, **kwargs}))

    def complete(self, text: str, **kwargs):
        return self._lockstep.call("complete", plain({"text": text, **kwargs}))


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
