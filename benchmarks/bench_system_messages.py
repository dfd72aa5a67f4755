"""Memory and disk of a server after many requests with distinct system messages.

    python benchmarks/bench_system_messages.py [--requests 1000] [--clients 4] [--state-cache 1G]

Apps put the date or the user's name in their system message, so every request's system text is new.
urial-edge renders a system message after the cached prefix (the shared prefix state is used, only the
system text's own tokens are prefilled) and keeps recent conversation states in a memory-bounded LRU;
nothing per request goes to disk. This drives a warm ``urial-edge serve`` with ``--requests`` chat
requests, each with its own system message, and records the server's resident memory and the cache
folder's size along the way.

Writes results/system_messages.{json,md,png}.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the optimised BLAS and light mlx_lm imports, before MLX loads
import argparse
import threading
import time
from pathlib import Path

from common import write_results

from urial_edge.disk.files import dir_size
from urial_edge.runtime.options import GenerationOptions
from urial_edge.disk.paths import cache_dir
from urial_edge.serve.client import chat_body, stream_chat
from urial_edge.serve.discovery import health
from urial_edge.testing.server_process import launch


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(info: dict, i: int) -> int:
    messages = [{"role": "system", "content": f"Today is day {i} of the trip. The user's name is Guest{i}."},
                {"role": "user", "content": "What should I do this afternoon?"}]
    for chunk in stream_chat(info, chat_body(messages, GenerationOptions(max_tokens=4))):
        if chunk["choices"][0].get("finish_reason"):
            return chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--state-cache", default="1G")
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", default=None)
    args = parser.parse_args()
    spec = [*(["--model", args.model] if args.model else []), *(["--prompt", args.prompt] if args.prompt else [])]
    proc, info = launch([*spec, "--state-cache", args.state_cache, "--max-batch", str(args.clients)])
    rows, done, lock = [], [0], threading.Lock()
    cache_before = dir_size(cache_dir()) if cache_dir().exists() else 0
    files_before = len(list(cache_dir().glob("*.safetensors")))
    marks = {10, 100, 250, 500, 750, args.requests}

    def record(n: int) -> None:
        states = health(info, timeout=30)["states"]
        rows.append({"requests": n, "server RSS MB": rss_mb(proc.pid), "state cache MB": states["bytes"] / 1e6,
                     "states kept": states["count"], "cache folder MB": dir_size(cache_dir()) / 1e6,
                     "new cache files": len(list(cache_dir().glob("*.safetensors"))) - files_before,
                     "seconds": time.perf_counter() - start})

    def worker() -> None:
        while True:
            with lock:
                if done[0] >= args.requests:
                    return
                done[0] += 1
                i = done[0]
            request(info, i)
            if i in marks:
                with lock:
                    record(i)

    start = time.perf_counter()
    try:
        record(0)
        threads = [threading.Thread(target=worker) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    rows.sort(key=lambda r: r["requests"])
    notes = (f"{args.requests} chat requests, each with a distinct system message, {args.clients} clients at once, "
             f"--state-cache {args.state_cache}, 4 answer tokens each. Cache folder before: "
             f"{cache_before / 1e6:.0f} MB.")
    md = write_results("system_messages", rows, list(rows[0]), "Distinct system messages: memory and disk", notes)
    print(md.read_text())


if __name__ == "__main__":
    main()
