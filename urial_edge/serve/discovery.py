"""Finding, checking and stopping running ``urial-edge serve`` processes.

Each server writes a record ``servers/<key>-<port>.json`` (``key``: its default
model and prompt; readable by its owner only) with its PID, the process's start
time as the OS reports it, its port, a random token, and the models (by
directory) and prompts (by the digest of their rendered prefix) it can serve. A
record is trusted only when the process and the server agree: PIDs are reused
(after a reboot, say), so a live PID alone never makes a record ours, and the
server must prove it holds the token: ``/health`` answers a random challenge
with its HMAC under the token (:func:`proof`), so the token itself never crosses
the wire and a server with an API key needs no key for it. ``serve --stop``
signals only a verified own process; ``ask`` and ``chat`` use a server only if
it proves itself within :data:`HEALTH_TIMEOUT` seconds, and otherwise answer
in-process. Several servers can be recorded at once.
"""

import hashlib
import hmac
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from ..disk.files import write_text_atomic
from ..disk.paths import servers_dir

DEFAULT_PORT = 8412
HEALTH_TIMEOUT = 2.0
CHALLENGE_HEADER = "X-Urial-Edge-Challenge"


def server_key(model_path: Path, prefix_text: str) -> str:
    return hashlib.sha256(f"{Path(model_path).resolve()}\n{prefix_text}".encode()).hexdigest()[:16]


def prefix_digest(prefix_text: str) -> str:
    """How a record names a prompt: the digest of its rendered prefix (the same text, the same prompt)."""
    return hashlib.sha256(prefix_text.encode()).hexdigest()[:16]


def proof(token: str, challenge: str) -> str:
    """What a server answers to a challenge: an HMAC of it under its record's token."""
    return hmac.new(token.encode(), challenge.encode("utf-8", "replace"), hashlib.sha256).hexdigest()


def process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started, as an opaque string; None if it does not run or the OS cannot tell."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self/stat").exists():
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        boot = Path("/proc/sys/kernel/random/boot_id")
        return f"{boot.read_text().strip() if boot.exists() else ''}:{fields[19]}"
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return out or None
    return None


def write_record(info: dict) -> Path:
    """Record this process as a server (``info`` has host, port, token, model, prompt, ...)."""
    record = servers_dir() / f"{info['key']}-{info['port']}.json"
    write_text_atomic(record, json.dumps({**info, "pid": os.getpid(), "process_start": process_start(os.getpid())}))
    os.chmod(record, 0o600)  # the token is the owner's
    return record


def health(info: dict, timeout: float = HEALTH_TIMEOUT, challenge: Optional[str] = None) -> Optional[dict]:
    """The server's ``/health`` answer, or None if it does not answer in time."""
    try:
        conn = http.client.HTTPConnection(info["host"], info["port"], timeout=timeout)
        conn.request("GET", "/health", headers={CHALLENGE_HEADER: challenge} if challenge else {})
        response = conn.getresponse()
        data = json.loads(response.read() or b"{}")
        conn.close()
        return data if response.status == 200 and isinstance(data, dict) else None
    except (OSError, ValueError, http.client.HTTPException):
        return None


def check(info: dict, timeout: float = HEALTH_TIMEOUT) -> str:
    """``ok`` (ours and answering), ``silent`` (ours, not answering), ``stale`` (not ours)."""
    pid, started = info.get("pid"), info.get("process_start")
    if not isinstance(pid, int):
        return "stale"
    now = process_start(pid)
    if started is not None and now is not None and now != started:
        return "stale"  # the PID belongs to another process now
    if started is not None and now is None and not _alive(pid):
        return "stale"
    challenge = secrets.token_hex(16)
    answer = health(info, timeout, challenge)
    if answer is not None and hmac.compare_digest(str(answer.get("proof", "")),
                                                  proof(str(info.get("token", "")), challenge)):
        return "ok"
    if started is not None and now == started:
        return "silent"
    return "stale"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def records() -> List[Tuple[Path, dict]]:
    folder = servers_dir()
    out = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            f.unlink(missing_ok=True)
            continue
        if isinstance(info, dict):
            out.append((f, info))
    return out


def running_servers() -> List[dict]:
    """Records of our servers with their state (``ok`` or ``silent``); records that are not ours are removed."""
    out = []
    for f, info in records():
        state = check(info)
        if state == "stale":
            f.unlink(missing_ok=True)
            continue
        out.append({**info, "state": state, "record": str(f)})
    return out


def find_server(model_path: Path, prefix_text: str, kv_bits: Optional[int]) -> Tuple[Optional[dict], List[dict]]:
    """A verified, answering server (without an API key) that serves this model and prompt with this KV
    precision, whichever model it was started with (one started with it first); and the records of our own
    servers for it that do not answer (stopped or hung). The info found has ``request_model``: the
    ``model:prompt`` name to send."""
    path, digest = str(Path(model_path).resolve()), prefix_digest(prefix_text)
    key = server_key(model_path, prefix_text)
    candidates = [(f, info) for f, info in records()
                  if path in (info.get("models") or {}) and digest in (info.get("prompts") or {})
                  and not info.get("api_key") and info.get("kv_bits") == kv_bits]
    silent = []
    for f, info in sorted(candidates, key=lambda c: c[1].get("key") != key):
        state = check(info)
        if state == "ok":
            return {**info, "request_model": f"{info['models'][path]}:{info['prompts'][digest]}"}, silent
        if state == "stale":
            f.unlink(missing_ok=True)
        else:
            silent.append(info)
    return None, silent


def stop(info: dict) -> bool:
    """Ask a verified own server to stop (SIGTERM; SIGCONT too, should it be stopped). False if not ours."""
    if info.get("state") not in ("ok", "silent"):
        return False
    os.kill(info["pid"], signal.SIGTERM)
    if info["state"] == "silent" and hasattr(signal, "SIGCONT"):
        os.kill(info["pid"], signal.SIGCONT)
    return True
