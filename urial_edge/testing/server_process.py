"""``urial-edge serve`` in a subprocess, for tests and benchmarks."""

import re
import subprocess
import sys
import time
from typing import List, Optional, Tuple

from ..errors import UrialError


def launch(args: List[str], env: Optional[dict] = None, timeout: float = 300) -> Tuple[subprocess.Popen, dict]:
    """Start ``urial-edge serve ARGS --port 0`` and wait for its address; returns (process, {host, port}).

    For benchmarks and tests; the process's stderr is a pipe (read it, or it may fill).
    """
    proc = subprocess.Popen([sys.executable, "-m", "urial_edge.cli", "serve", *args, "--port", "0"], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        found = re.search(r"on http://(\[[^\]]+\]|[^:/\s]+):(\d+)/v1", line or "")
        if found:
            return proc, {"host": found.group(1).strip("[]"), "port": int(found.group(2))}
        if not line and proc.poll() is not None:
            raise UrialError(f"the server exited: {proc.stderr.read().strip()[-300:]}")
    proc.kill()
    raise UrialError("the server did not start in time")
