"""Models and prompts on demand: what a server can serve, what it has loaded, and for how long.

A request names ``model`` or ``model:prompt`` (``gemma-3-270m``,
``gemma-3-270m:urial-k3``; Ollama's ``:latest`` is the default prompt). The
server can serve every model in the store or the registry that answers without a
download, with every shipped prompt and its own ``--prompt``.

One :class:`Loaded` per model holds one copy of the weights and tokenizer, one
engine (its own thread) and, per prompt asked of it, an ``Assistant`` that shares
them (``Assistant.with_prompt``) and resumes from its own cached prefix state, so
answers of several prompts of one model decode in the same batches. A model is
loaded by the request that first needs it, on a loading thread of lower CPU
priority: the models already loaded keep answering on their own engine threads
meanwhile, with their share of the cores.

A loaded model stays for its keep-alive time after its last answer (the server's
``--keep-alive``; a request's ``keep_alive`` replaces it, as in Ollama: 0 unloads
it after the answer, a negative value keeps it for ever); the model the server was
started with is kept for ever. Loaded models stay within ``--max-models`` and
``--max-memory`` (estimated: weight files, prefix states, conversation states):
to load another, the least recently used idle models are unloaded first; a model
with answers in flight is never unloaded. Unloading stops the model's engine
thread, drops every reference and returns MLX's buffers to the system.
"""

import ctypes
import gc
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import mlx.core as mx

from ..disk.paths import package_data
from ..errors import UrialError, one_line
from ..model.loading import weight_files
from ..model.registry import load_registry
from ..model.store import list_models, resolve_model
from ..runtime.engine import mlx_thread
from ..runtime.prompt import Prompt, builtin_prompts, load_prompt
from ..units import format_size, parse_keep_alive
from .http import BadRequest

LOADER_NICE = 10  # how much lower a loading thread's CPU priority is (Linux)
LOAD_WAIT = 60.0  # seconds a load waits for busy models to make room before the request gets 503
CLOSE_WAIT = 120.0  # seconds closing waits for loads under way (MLX work must not run at exit)
SHUTTING_DOWN = "the server is shutting down"
REAP_EVERY = 1.0
LATEST = "latest"  # Ollama's tag for "the default": here, the default prompt

Loader = Callable[[Path, Prompt], object]  # (model directory, prompt) -> a started Assistant
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def split_name(requested: str) -> Tuple[str, Optional[str]]:
    """``"model:prompt"`` -> ``(model, prompt)``; no prompt (or Ollama's ``latest``) gives None."""
    model, _, prompt = requested.strip().rpartition(":") if ":" in requested else (requested.strip(), "", "")
    return model, (prompt if prompt and prompt != LATEST else None)


def loading_thread(work: Callable[[], object]) -> object:
    """``work()`` on a thread of its own at a lower CPU priority, its result (or error) handed back here.

    Loading a model reads and converts its weights and may build its prefix state: seconds of CPU. On
    Linux, where priority is per thread (and the MLX stream thread a thread starts inherits it), the
    engines of the models already loaded keep their share of the cores meanwhile.
    """
    out: dict = {}

    def run() -> None:
        if sys.platform.startswith("linux"):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
        try:
            out["value"] = work()
        except BaseException as e:  # re-raised in the requesting thread
            out["error"] = e

    thread = threading.Thread(target=mlx_thread(run), name="urial-edge-loader", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def model_name(spec: Optional[str], path: Path) -> str:
    """The name requests use for the model a server was started with: its registry or store name (or repo
    id), else its folder's name."""
    spec = spec or os.environ.get("URIAL_EDGE_MODEL") or load_registry()[0]
    if Path(spec).expanduser().exists():
        return path.name
    return spec


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(path))


@dataclass
class Loaded:
    """One loaded model: its weights, tokenizer and engine, and an Assistant per prompt asked of it."""

    name: str
    path: Path
    prompts: Dict[str, object]  # prompt name -> Assistant (all sharing the first one's engine)
    weights: int
    keep_alive: Optional[float]  # seconds after the last answer; None: for ever
    load_seconds: float
    users: int = 0  # requests using it now
    last_used: float = field(default_factory=time.time)
    loaded_at: float = field(default_factory=time.time)

    @property
    def first(self):
        return next(iter(self.prompts.values()))

    @property
    def engine(self):
        return self.first.engine

    def nbytes(self) -> int:
        """Estimated memory: weights, the prefix state of each prompt, the kept conversation states."""
        prefixes = sum(sum(c.nbytes for c in a.prefix.state) for a in self.prompts.values())
        return self.weights + prefixes + self.first.states.nbytes

    def idle(self) -> bool:
        return self.users == 0 and not self.engine.busy()

    def expires_at(self) -> Optional[float]:
        return None if self.keep_alive is None else self.last_used + self.keep_alive


@dataclass
class Served:
    """What a request is answered with: the assistant, the model name to echo, the time spent loading."""

    assistant: object
    name: str
    load_seconds: float


class Pool:
    """The models a server has loaded, loaded on demand and unloaded when idle or when room is needed."""

    def __init__(self, default, default_name: str, load: Optional[Loader], keep_alive: Optional[float] = 300.0,
                 max_models: int = 3, max_memory: Optional[int] = None):
        """``default`` (a started Assistant) is kept for ever; ``load`` None serves only it (a model split over
        several ranks, whose ranks replay one assistant's calls)."""
        self.default_name, self.default_prompt, self.default_options = default_name, default.prompt, default.options
        self.max_batch = default.batch_size  # every model loaded decodes this many answers together
        self.load, self.keep_alive = load, keep_alive
        self.max_models, self.max_memory = max_models, max_memory
        self.lock = threading.Condition()
        self.models: Dict[Path, Loaded] = {}
        # (path, None) for a model being loaded, (path, prompt name) for a prompt being added: the bytes reserved
        self.loading: Dict[Tuple[Path, Optional[str]], int] = {}
        self.paths: Dict[str, Path] = {default_name: default.model_path}  # names resolved so far
        # shipped prompts do not change while the server runs: found once (1.2 ms a time here), read when named
        self.shipped = {name: package_data("prompts", f"{name}.toml") for name in builtin_prompts()}
        self._prompts: Dict[str, Prompt] = {}  # prompts read so far
        self.finished_before: Dict[str, int] = {}  # answers by outcome of the models unloaded so far
        self.closed = False
        self.stopping = threading.Event()  # the server's: once set, a model ready for a request answers nothing
        self.load_wait = LOAD_WAIT
        self.models[default.model_path] = Loaded(default_name, default.model_path, {default.prompt.name: default},
                                                 weights_bytes(default.model_path), None, 0.0)
        threading.Thread(target=self._reap, name="urial-edge-reaper", daemon=True).start()

    # -- names -------------------------------------------------------------------------------------

    def prompts(self) -> Dict[str, Path]:
        """The prompts requests may name: the shipped ones and the server's own (which wins a shared name)."""
        return {**self.shipped, self.default_prompt.name: self.default_prompt.path}

    def prompt_names(self) -> List[str]:
        return list(self.prompts()) if self.load is not None else [self.default_prompt.name]

    def prompt(self, name: Optional[str]) -> Prompt:
        if name is None or name == self.default_prompt.name:
            return self.default_prompt
        known = self.prompts()
        if self.load is None or name not in known:
            choices = ", ".join(known) if self.load is not None else self.default_prompt.name
            raise BadRequest(f"unknown prompt {name!r}; this server's prompts: {choices}", 404, "model")
        if name not in self._prompts:
            self._prompts[name] = load_prompt(str(known[name]))
        return self._prompts[name]

    def servable(self) -> List[dict]:
        """Every model a request may name: the store's and the registry's that answer without a download,
        and the server's own; rows of ``list_models`` plus ``loaded``."""
        rows = [r for r in list_models() if r["local"]] if self.load is not None else []
        if all(r["name"] != self.default_name for r in rows):
            rows.insert(0, {"name": self.default_name, "source": str(self.paths[self.default_name]),
                            "status": "ready", "local": True, "default": True, "description": ""})
        with self.lock:
            loaded = {m.name: m for m in self.models.values()}
        return [{**r, "loaded": loaded.get(r["name"])} for r in rows]

    def resolve(self, name: str) -> Path:
        """The model directory of a name a request gave; 404 with the reason if it cannot be served."""
        if name in self.paths:
            return self.paths[name]
        if self.load is None:
            raise BadRequest(f"model {name!r} not found: this server runs split over several ranks and serves "
                             f"only {self.default_name!r}", 404, "model")
        row = next((r for r in list_models() if r["name"] == name), None)
        if row is None:
            raise BadRequest(f"model {name!r} not found; GET /v1/models (or /api/tags) lists the models this "
                             "server can serve", 404, "model")
        if not row["local"]:
            raise BadRequest(f"model {name!r} is not downloaded; run `urial-edge models pull {name}` first",
                             404, "model")
        try:
            path = resolve_model(name)
        except UrialError as e:
            raise BadRequest(f"model {name!r} cannot be served: {one_line(e)}", 404, "model") from None
        self.paths[name] = path
        return path

    def named(self, requested) -> Tuple[str, Optional[str]]:
        """A request's ``model`` as ``(model, prompt or None)``; no model is the server's default."""
        if requested is not None and not isinstance(requested, str):
            raise BadRequest(f"'model' must be a string, got {type(requested).__name__}", param="model")
        return split_name(requested) if requested else (self.default_name, None)

    def ready_path(self, row: dict) -> Optional[Path]:
        """The directory of a servable model if it is on disk already (a listing converts nothing)."""
        if row["name"] in self.paths:
            return self.paths[row["name"]]
        if row["status"] == "converts on first use":
            return None
        try:
            return self.resolve(row["name"])
        except BadRequest:
            return None

    # -- using a model --------------------------------------------------------------------------

    @contextmanager
    def use(self, requested: Optional[str], keep_alive=None) -> Iterator[Served]:
        """The assistant for ``requested`` (None or "": the default), loaded if need be, held for the
        duration of the block (it is not unloaded meanwhile); ``keep_alive`` (as Ollama's) applies after."""
        started = time.perf_counter()
        name, prompt_name = self.named(requested)
        keep = parse_keep_alive(keep_alive) if keep_alive is not None else None
        loaded, assistant = self._acquire(self.resolve(name), name, self.prompt(prompt_name))
        if self.closed or self.stopping.is_set():  # the server stops (maybe while this request's model loaded)
            self._release(loaded, False, None)
            raise BadRequest(SHUTTING_DOWN, 503)
        try:
            yield Served(assistant, requested or self.default_name, time.perf_counter() - started)
        finally:
            self._release(loaded, keep_alive is not None, keep)

    def _acquire(self, path: Path, name: str, prompt: Prompt):
        """The loaded model (its user count raised) and the assistant for ``prompt``, loading what is missing.

        Only requests for the same model, or the same prompt of it, wait for a load under way."""
        model_key, prompt_key = (path, None), (path, prompt.name)
        with self.lock:
            while model_key in self.loading or prompt_key in self.loading:
                self.lock.wait()
            loaded = self.models.get(path)
            if loaded is not None:
                loaded.users += 1
                if prompt.name in loaded.prompts:
                    return loaded, loaded.prompts[prompt.name]
            key = model_key if loaded is None else prompt_key
            self.loading[key] = 0
        try:
            if loaded is None:
                loaded = self._load(path, name, prompt)
            else:
                self._add_prompt(loaded, prompt)
        except BaseException:
            with self.lock:
                if path in self.models and loaded is not None:
                    loaded.users -= 1
            raise
        finally:
            with self.lock:
                del self.loading[key]
                self.lock.notify_all()
        return loaded, loaded.prompts[prompt.name]

    def _load(self, path: Path, name: str, prompt: Prompt) -> Loaded:
        need = weights_bytes(path)
        if self.max_memory is not None and need > self.max_memory:
            raise BadRequest(f"model {name!r} needs about {format_size(need)}, more than this server's memory "
                             f"budget (--max-memory {format_size(self.max_memory)})", 400, "model")
        with self.lock:
            self.loading[(path, None)] = need
        self._make_room(name)
        started = time.perf_counter()
        assistant = loading_thread(lambda: self.load(path, prompt))
        loaded = Loaded(name, path, {prompt.name: assistant}, need, self.keep_alive,
                        time.perf_counter() - started, users=1)
        with self.lock:
            self.models[path] = loaded
        return loaded

    def _add_prompt(self, loaded: Loaded, prompt: Prompt) -> None:
        sibling = loaded.first.with_prompt(prompt)
        loading_thread(sibling.start)  # loads or builds its prefix state
        with self.lock:
            loaded.prompts[prompt.name] = sibling

    def _release(self, loaded: Loaded, replace: bool, keep: Optional[float]) -> None:
        with self.lock:
            loaded.users -= 1
            loaded.last_used = time.time()
            if replace and self.load is not None:
                loaded.keep_alive = keep
            self.lock.notify_all()
        self.reap()

    def expire(self, requested: Optional[str]) -> None:
        """Unload a model as soon as it is idle (Ollama's request with ``keep_alive: 0`` and nothing to answer)."""
        path = self.paths.get(self.named(requested)[0])
        with self.lock:
            loaded = self.models.get(path)
            if loaded is not None and self.load is not None:
                loaded.keep_alive, loaded.last_used = 0.0, time.time()
        self.reap()

    # -- room and unloading -----------------------------------------------------------------------

    def _make_room(self, name: str) -> None:
        """Unload idle models, least recently used first, until the models loaded and being loaded fit."""
        deadline = time.monotonic() + self.load_wait
        try:
            with self.lock:
                while not self._fits():
                    victim = self._least_recent_idle()
                    if victim is not None:
                        self._unload(victim)
                        continue
                    if time.monotonic() > deadline:
                        raise BadRequest(f"no room to load {name!r}: the models loaded ("
                                         f"{', '.join(m.name for m in self.models.values())}) are all answering; "
                                         "try again", 503, "model", {"Retry-After": "5"})
                    self.lock.wait(0.5)
        finally:
            self._free()

    def _least_recent_idle(self) -> Optional[Path]:
        idle = [m for m in self.models.values() if m.idle()]
        return min(idle, key=lambda m: m.last_used).path if idle else None

    def _fits(self) -> bool:
        models = len(self.models) + sum(1 for _, prompt in self.loading if prompt is None)
        memory = sum(m.nbytes() for m in self.models.values()) + sum(self.loading.values())
        return models <= self.max_models and (self.max_memory is None or memory <= self.max_memory)

    def reap(self) -> None:
        """Unload the idle models whose keep-alive time is over."""
        now = time.time()
        with self.lock:
            expired = [m.path for m in self.models.values()
                       if m.expires_at() is not None and m.expires_at() <= now and m.idle()
                       and not any(path == m.path for path, _ in self.loading)]
            for path in expired:
                self._unload(path)
        if expired:
            self._free()

    def _reap(self) -> None:
        while True:
            with self.lock:
                self.lock.wait(REAP_EVERY)
                if self.closed:
                    return
            self.reap()

    def _unload(self, path: Path) -> None:
        """Drop an idle model (the lock is held): stop its engine thread, keep the count of its answers."""
        loaded = self.models.pop(path)
        loaded.engine.stop()
        for reason, n in loaded.engine.finished.items():
            self.finished_before[reason] = self.finished_before.get(reason, 0) + n
        loaded.prompts.clear()

    @staticmethod
    def _free() -> None:
        """Return the memory of unloaded models to the system, once no reference to them is left."""
        gc.collect()  # generations and their engine refer to each other
        mx.clear_cache()
        if _LIBC is not None:  # glibc keeps freed heap pages (threads' arenas) unless asked to give them back
            _LIBC.malloc_trim(0)

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """Stop the reaper, let the loads under way finish (their requests then get 503), and stop the engine
        threads of the idle models (a split model's lock-step stops its own)."""
        deadline = time.monotonic() + wait
        with self.lock:
            self.closed = True
            self.lock.notify_all()
            while self.loading and time.monotonic() < deadline:
                self.lock.wait(0.1)
            engines = [m.engine for m in self.models.values() if m.idle()] if self.load is not None else []
        for engine in engines:
            engine.stop()

    # -- reports -------------------------------------------------------------------------------

    def loaded(self) -> List[Loaded]:
        with self.lock:
            return list(self.models.values())

    def load_report(self) -> dict:
        """Answers in flight, waiting and finished (by outcome) over every model, loaded or not since."""
        finished = dict(self.finished_before)
        active = waiting = 0
        for m in self.loaded():
            load = m.engine.load
            active, waiting = active + load["active"], waiting + load["waiting"]
            for reason, n in load["finished"].items():
                finished[reason] = finished.get(reason, 0) + n
        return {"active": active, "waiting": waiting, "finished": finished}
