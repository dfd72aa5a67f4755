"""Time to first token from the cached URIAL prefix vs a full prefill, per prompt size.

    python benchmarks/bench_prefix_cache.py [--model M] [--repeats 3]

Side by side in one warm process on the same model: for the K=0, 1, 3 and 8
prompts, cache build time, file size, load time, and time to first token
resumed from the cache vs with a full prefill. Then 8- and 4-bit KV caches for
K=3: file size and whether the greedy answers change. Writes
results/prefix_cache.{json,md}.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the optimised BLAS and light mlx_lm imports, before MLX loads
import argparse

from common import best_of, write_results

from urial_edge.runtime.assistant import Assistant
from urial_edge.runtime.prompt import load_prompt
from urial_edge.units import format_size

QUERY = "What are three good habits for staying healthy while working from home?"


def assistant_for(base: Assistant, prompt: str, kv_bits=None) -> Assistant:
    return Assistant(base.model, base.config, base.tokenizer, base.model_path, load_prompt(prompt),
                     base.options, kv_bits, True, lambda done, total: None)


def measure(base: Assistant, prompt: str, repeats: int, kv_bits=None) -> dict:
    bot = assistant_for(base, prompt, kv_bits)
    path = bot.prefix.path
    path.unlink(missing_ok=True)
    bot._prefix = None
    build = bot.prefix.seconds
    load_s, _ = best_of(lambda: assistant_for(base, prompt, kv_bits).prefix, repeats)
    cached_ttft = min(bot.ask(QUERY, max_tokens=1).stats.ttft for _ in range(repeats))
    full_ttft = min(bot.ask(QUERY, max_tokens=1, no_cache=True).stats.ttft for _ in range(repeats))
    return {
        "prompt": prompt, "kv_bits": kv_bits or "none", "prefix_tokens": len(bot.prefix_ids),
        "build_s": build, "file_size": format_size(path.stat().st_size), "file_bytes": path.stat().st_size,
        "load_s": load_s, "ttft_cached_s": cached_ttft, "ttft_full_s": full_ttft,
        "speedup": full_ttft / cached_ttft,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    base = Assistant.load(args.model, "urial-k3", max_tokens=args.max_tokens)
    base.ask("warm up", max_tokens=2)
    rows = [measure(base, f"urial-k{k}", args.repeats) for k in (0, 1, 3, 8)]
    reference = assistant_for(base, "urial-k3").ask(QUERY)
    full = assistant_for(base, "urial-k3").ask(QUERY, no_cache=True)
    rows[2]["same_output_as_full"] = reference.text == full.text
    for bits in (8, 4):
        row = measure(base, "urial-k3", args.repeats, kv_bits=bits)
        answer = assistant_for(base, "urial-k3", bits).ask(QUERY)
        row["same_output_as_full"] = answer.text == reference.text
        rows.append(row)
    for row in rows:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    columns = ["prompt", "kv_bits", "prefix_tokens", "build_s", "file_size", "load_s",
               "ttft_cached_s", "ttft_full_s", "speedup", "same_output_as_full"]
    notes = (f"Warm process, one model, best of {args.repeats}. `speedup` = full-prefill TTFT / cached TTFT. "
             f"`same_output_as_full`: greedy answer ({args.max_tokens} tokens max) equals the unquantized "
             "full-prefill answer.")
    print(write_results("prefix_cache", rows, columns, "Prefix cache: time to first token", notes))


if __name__ == "__main__":
    main()
