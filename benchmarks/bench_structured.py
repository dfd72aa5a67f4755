"""Structured output on the bundled model (issue 21's figures), side by side in one run.

    python benchmarks/bench_structured.py [--max-tokens 256] [--repeats 2] [--cost-tasks 8] [--tasks N]

1. Quality on our task set (benchmarks/structured/tasks.jsonl: 53 extraction and classification tasks, scored
   as its README says), greedy, 8 answers decoded together: for each place a schema's field descriptions can
   go (none, the query, a system text, both), constrained and unconstrained answers to the same prompts:
   validity (the answer parses as JSON and validates against its schema; an unconstrained answer may have
   text around one JSON object) and accuracy (the share of the expected leaf fields that the answer has).
2. Cost on the first --cost-tasks tasks, at batch 1 and batch 8: tokens/s unconstrained, constrained token by
   token, and constrained with fast-forward, with equal work (each unconstrained answer runs exactly as many
   tokens as the constrained answer to the same task, past its frame), best of --repeats taken in turns; the
   host time per token spent on the constraint; the token ids with and without fast-forward compared.
3. A mixed batch: 1 constrained and 7 unconstrained answers against 8 unconstrained, equal work: what
   unconstrained rows pay for sharing a step with a constrained row.

Writes results/structured.{json,md,png}.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the optimised BLAS and light mlx_lm imports, before MLX loads
import json
import time
from dataclasses import replace
from pathlib import Path

import jsonschema
from common import RESULTS, fmt, in_turns, model_arguments, write_results

from urial_edge.runtime.assistant import Assistant
from urial_edge.runtime.constraints import DEFAULT_DESCRIBE, DESCRIBE, make, with_description

TASKS = Path(__file__).resolve().parent / "structured" / "tasks.jsonl"
BATCH = 8


def load_tasks() -> list:
    return [json.loads(line) for line in TASKS.read_text().splitlines() if line.strip()]


def request(bot, task: dict, describe: str, constrained: bool, **options):
    """The same prompt with and without the constraint: the task's query, and the schema's field descriptions
    where ``describe`` puts them. Two tasks use uniqueItems, which a grammar cannot enforce: their constraint
    is lenient (the rest of the schema is enforced; the answers are validated against the whole schema)."""
    schema = {**task["schema"], "x-guidance": {"lenient": True}}
    query, system = with_description(make("schema", schema), describe, f"{task['instruction']}\n\n{task['input']}",
                                      "")
    return bot.request(query, system=system, remember=False, describe="none",
                       **({"schema": schema} if constrained else {}), **options)


def parsed(text: str):
    """The JSON in an answer: the whole text, or its outermost {...} (free text around one object)."""
    for candidate in (text, text[text.find("{"):text.rfind("}") + 1]):
        try:
            return json.loads(candidate), True
        except ValueError:
            continue
    return None, False


MISSING = object()  # no answer there: it equals nothing, not even an expected null


def leaves_equal(expected, got) -> tuple:
    """(fields equal, fields) over the expected value's leaves, by the task set's rules (README there)."""
    if isinstance(expected, dict) and expected:
        pairs = [leaves_equal(v, got.get(k, MISSING) if isinstance(got, dict) else MISSING)
                 for k, v in expected.items()]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    if isinstance(expected, list) and expected:
        got = got if isinstance(got, list) else []
        pairs = [leaves_equal(v, got[i] if i < len(got) else MISSING) for i, v in enumerate(expected)]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return int(same(expected, got)), 1


def same(expected, got) -> bool:
    if got is MISSING:
        return False
    if expected is None or isinstance(expected, bool):
        return got is expected
    if isinstance(expected, (int, float)):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and abs(expected - got) < 1e-9
    if isinstance(expected, str):
        return isinstance(got, str) and expected.strip().lower() == got.strip().lower()
    return expected == got


def quality(bot, tasks: list, describe: str, constrained: bool, max_tokens: int) -> dict:
    """One run over the task set; validity and accuracy with per-task detail."""
    requests = [request(bot, t, describe, constrained, max_tokens=max_tokens) for t in tasks]
    start = time.perf_counter()
    answers = list(bot.run(requests, BATCH))
    seconds = time.perf_counter() - start
    rows, right, total = [], 0, 0
    for t, a in zip(tasks, answers):
        value, ok = (a.value, a.finish_reason == "stop") if constrained else parsed(a.text)
        valid = ok and jsonschema.Draft202012Validator(t["schema"]).is_valid(value)
        r, n = leaves_equal(t["expected"], value if ok else MISSING)
        right, total = right + r, total + n
        rows.append({"id": t["id"], "finish": a.finish_reason, "tokens": a.tokens, "valid": valid,
                     "fields_right": r, "fields": n, "text": a.text})
    return {"describe": describe, "constrained": constrained, "validity": sum(r["valid"] for r in rows) / len(rows),
            "accuracy": right / total, "length_cut": sum(r["finish"] == "length" for r in rows),
            "tokens": sum(r["tokens"] for r in rows), "seconds": seconds, "tasks": rows}


def equal_work(bot, tasks: list, lengths: list, max_tokens: int, mode: str) -> list:
    """Requests for ``mode``: "constrained" (the schema), or "unconstrained" answers that run exactly as many
    tokens as the constrained answers did (no frame, so no stop string ends them early)."""
    if mode == "constrained":
        return [request(bot, t, DEFAULT_DESCRIBE, True, max_tokens=max_tokens) for t in tasks]
    return [replace(request(bot, t, DEFAULT_DESCRIBE, False, max_tokens=n), framed=False) for t, n in zip(tasks, lengths)]


def run_timed(bot, requests: list, batch_size: int, fast_forward: bool = True) -> dict:
    bot.engine.fast_forward = fast_forward
    start = time.perf_counter()
    answers = list(bot.run(requests, batch_size))
    seconds = time.perf_counter() - start
    bot.engine.fast_forward = True
    tokens = sum(a.tokens for a in answers)
    host = sum(a.stats.constraint_seconds for a in answers)
    return {"seconds": seconds, "tokens": tokens, "tps": tokens / seconds, "host_ms_per_token": 1e3 * host / tokens,
            "ids": [a.token_ids for a in answers], "lengths": [a.tokens for a in answers]}


def cost(bot, tasks: list, lengths: list, max_tokens: int, repeats: int) -> dict:
    """Tokens/s at batch 1 and 8: unconstrained vs constrained token by token vs with fast-forward; ``lengths``
    are the constrained answers' (from the quality run with the default descriptions: greedy, so the same)."""
    rows, same_ids, equal = [], {}, {}
    for batch_size in (1, BATCH):
        modes = {
            "unconstrained": lambda: run_timed(bot, equal_work(bot, tasks, lengths, max_tokens, "unconstrained"),
                                               batch_size),
            "constrained, token by token": lambda: run_timed(
                bot, equal_work(bot, tasks, lengths, max_tokens, "constrained"), batch_size, fast_forward=False),
            "constrained, fast-forward": lambda: run_timed(
                bot, equal_work(bot, tasks, lengths, max_tokens, "constrained"), batch_size),
        }
        best = in_turns(modes, repeats, key=lambda r: r["seconds"])
        base = best["unconstrained"]["tps"]
        for mode, r in best.items():
            rows.append({"batch": batch_size, "mode": mode, "tokens": r["tokens"], "seconds": r["seconds"],
                         "tok/s": r["tps"], "vs unconstrained": r["tps"] / base,
                         "constraint host ms/token": r["host_ms_per_token"] if mode != "unconstrained" else None})
        same_ids[batch_size] = best["constrained, token by token"]["ids"] == best["constrained, fast-forward"]["ids"]
        equal[batch_size] = all(r["lengths"] == lengths for r in best.values())  # every mode: equal work
    return {"rows": rows, "lengths": lengths, "fast_forward_ids_identical": same_ids, "equal_work": equal}


def mixed(bot, tasks: list, lengths: list, max_tokens: int, repeats: int) -> dict:
    """8 unconstrained answers, against the same with the first one constrained (equal work)."""
    def plain():
        return run_timed(bot, equal_work(bot, tasks, lengths, max_tokens, "unconstrained"), BATCH)

    def one_constrained():
        requests = equal_work(bot, tasks, lengths, max_tokens, "unconstrained")
        requests[0] = equal_work(bot, tasks[:1], lengths[:1], max_tokens, "constrained")[0]
        return run_timed(bot, requests, BATCH)

    best = in_turns({"8 unconstrained": plain, "1 constrained + 7 unconstrained": one_constrained}, repeats,
                    key=lambda r: r["seconds"])
    base = best["8 unconstrained"]["seconds"]
    return {name: {"seconds": r["seconds"], "tokens": r["tokens"], "tok/s": r["tps"], "time vs unconstrained":
                   r["seconds"] / base} for name, r in best.items()}


def main():
    parser = model_arguments(max_tokens=256, repeats=2)
    parser.add_argument("--cost-tasks", type=int, default=BATCH)
    parser.add_argument("--tasks", type=int, default=None, help="only the first N tasks (a quick check)")
    args = parser.parse_args()
    bot = Assistant.load(args.model, args.prompt, batch_size=BATCH)
    tasks = load_tasks()[:args.tasks]
    started = time.perf_counter()
    bot.ask("Warm up.", schema={"type": "object"}, max_tokens=4)  # builds llguidance's tokenizer object once
    warm = time.perf_counter() - started
    runs = [quality(bot, tasks, d, c, args.max_tokens) for d in DESCRIBE for c in (True, False)]
    default = next(r for r in runs if r["describe"] == DEFAULT_DESCRIBE and r["constrained"])
    lengths = [t["tokens"] for t in default["tasks"][:args.cost_tasks]]
    spent = cost(bot, tasks[:args.cost_tasks], lengths, args.max_tokens, args.repeats)
    shared = mixed(bot, tasks[:BATCH], spent["lengths"][:BATCH], args.max_tokens, args.repeats)
    write(bot, args, tasks, runs, spent, shared, warm)


def write(bot, args, tasks, runs, spent, shared, warm) -> None:
    quality_rows = [{"describe": r["describe"], "constrained": "yes" if r["constrained"] else "no",
                     "validity": r["validity"], "accuracy": r["accuracy"], "cut at max_tokens": r["length_cut"],
                     "tokens": r["tokens"], "seconds": r["seconds"]} for r in runs]
    notes = (f"Bundled model, prompt {bot.prompt.name}, greedy with the default repetition penalty, "
             f"{len(tasks)} tasks, {BATCH} answers decoded together, at most {args.max_tokens} tokens; the default "
             f"place for field descriptions is '{DEFAULT_DESCRIBE}'. Building llguidance's tokenizer object and a "
             f"first answer took {warm:.1f} s. Fast-forward token ids identical to token by token: "
             f"{spent['fast_forward_ids_identical']}. Mixed batch (equal work): " +
             "; ".join(f"{k} {v['seconds']:.1f} s (x{v['time vs unconstrained']:.2f})" for k, v in shared.items()))
    columns = ["describe", "constrained", "validity", "accuracy", "cut at max_tokens", "tokens", "seconds"]
    md = write_results("structured", quality_rows, columns, "Structured output: quality and cost on the bundled model",
                       notes, extra={"quality": runs, "cost": spent, "mixed": shared, "warm_seconds": warm})
    cost_columns = ["batch", "mode", "tokens", "seconds", "tok/s", "vs unconstrained", "constraint host ms/token"]
    lines = ["", f"## Cost (first {args.cost_tasks} tasks, equal work, best of {args.repeats} in turns)", "",
             "| " + " | ".join(cost_columns) + " |", "|" + "---|" * len(cost_columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cost_columns) + " |" for r in spent["rows"]]
    md.write_text(md.read_text() + "\n".join(lines) + "\n")
    plot(runs, spent["rows"])
    print(md.read_text())


def plot(runs: list, cost_rows: list) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    places = [d for d in DESCRIBE if any(r["describe"] == d for r in runs)]
    x = range(len(places))
    for k, (constrained, metric, color) in enumerate([(True, "validity", "#4c72b0"), (True, "accuracy", "#55a868"),
                                                      (False, "validity", "#a6bddb"), (False, "accuracy", "#b8e0b8")]):
        values = [next(r[metric] for r in runs if r["describe"] == d and r["constrained"] == constrained)
                  for d in places]
        a.bar([i + 0.2 * k - 0.3 for i in x], values, 0.2, color=color,
              label=f"{metric}, {'constrained' if constrained else 'unconstrained'}")
    a.set_xticks(list(x), [f"descriptions: {d}" for d in places], fontsize=8)
    a.set_ylim(0, 1.05)
    a.legend(fontsize=7)
    a.set_title("53 tasks, bundled model")
    modes = ["unconstrained", "constrained, token by token", "constrained, fast-forward"]
    for k, mode in enumerate(modes):
        rows = [r for r in cost_rows if r["mode"] == mode]
        b.bar([i + 0.27 * k - 0.27 for i in range(len(rows))], [r["tok/s"] for r in rows], 0.27, label=mode)
    b.set_xticks(range(2), ["batch 1", f"batch {BATCH}"])
    b.set_ylabel("tokens/s (equal work)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "structured.png", dpi=120)


if __name__ == "__main__":
    main()
