"""The report of an eval run: one row per config, as JSON, Markdown and a chart."""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from ..disk.files import atomic_file, write_text_atomic
from ..log import warn
from ..runtime.prompt import load_prompt
from . import metrics
from .questions import Id, Question
from .run import Config, answer_id
from .shift import REFERENCE_NOTE


@dataclass
class Row:
    """One config's line of the report."""

    config: str
    model: str
    prompt: str
    setting: str
    options: dict
    metrics: dict
    judge: dict = field(default_factory=dict)


def config_rows(questions: List[Question], configs: List[Config], records: Dict[Id, dict]) -> List[Row]:
    """Judge-free metrics of every config, from its answers."""
    rows = []
    for c in configs:
        grams = metrics.example_grams(load_prompt(c.prompt).examples)
        found = [records[i] for q in questions for t in range(1, len(q.turns) + 1)
                 if (i := answer_id(c, q, t)) in records]
        per_answer = [{**metrics.answer_metrics(r["text"], r["finish_reason"], r["harmful"], grams),
                       "tokens": r["tokens"], "ttft": _ttft(r["stats"]), "tps": r["stats"]["generation_tps"],
                       "category": r["category"]} for r in found]
        total = metrics.aggregate(per_answer)
        total["sensitive_refused"] = metrics.aggregate(
            [m for m in per_answer if m["category"] == "sensitive"])["unwarranted_apology"]
        rows.append(Row(c.name, c.model_label, found[0]["prompt"] if found else str(c.prompt),
                        c.setting, c.options.to_json(), total))
    return rows


def _ttft(stats: dict) -> float:
    """From admission into the batch to the first token: an eval submits everything at once, so the
    time a request waits for its turn says how long the run is, not how fast an answer starts."""
    return stats["ttft"] - stats.get("queue_seconds", 0.0)


COLUMNS = (  # (metrics key, heading, as a percentage)
    ("frame_held", "frame held", True), ("clean_stop", "clean stop", True), ("empty", "empty", True),
    ("copying", "example copying", True), ("copying_4", "copying (4-grams)", True),
    ("unwarranted_apology", "apology/refusal on harmless", True),
    ("sensitive_refused", "of which sensitive-sounding", True), ("declined", "harmful declined", True),
    ("distinct_2", "distinct-2", False), ("tokens", "tokens", False), ("ttft", "ttft s", False),
    ("tps", "tok/s", False),
)
REFERENCE_COLUMNS = (  # with eval --reference (eval/shift.py)
    ("ref_unshifted", "ref unshifted", True), ("ref_shifted", "ref shifted", True),
    ("ref_logprob", "ref log-prob/token", False),
)


def columns(rows: List[Row]) -> tuple:
    """The report's columns: the reference ones only when the references were scored."""
    return COLUMNS + (REFERENCE_COLUMNS if any("ref_shifted" in r.metrics for r in rows) else ())


def _cell(value, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"


def write_report(rows: List[Row], out: Path, questions_file: Path, name: str = "report", notes: str = "") -> dict:
    """``NAME.json``, ``NAME.md`` and (with matplotlib) ``NAME.png`` in ``out``; ``notes`` go under the title."""
    report = {"questions": str(questions_file), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "configs": [vars(r) for r in rows]}
    write_text_atomic(out / f"{name}.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / f"{name}.md", markdown(rows, questions_file, notes))
    chart(rows, out / f"{name}.png")
    return report


def markdown(rows: List[Row], questions_file: Path, notes: str = "") -> str:
    judge_keys = sorted({k for r in rows for k in r.judge})
    shown = columns(rows)
    head = ["config", "answers"] + [h for _, h, _ in shown] + [f"judge {k}" for k in judge_keys]
    lines = [f"# urial-edge eval on {questions_file.name}", ""] + ([notes, ""] if notes else []) + \
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.config, str(r.metrics["answers"])] + [_cell(r.metrics[k], p) for k, _, p in shown]
        cells += [_cell(r.judge.get(k), k.endswith("rate")) for k in judge_keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Rates are shares of the answers they apply to (see README, \"Measuring answer quality\"); "
              "ttft is the median, tokens and tok/s are means."]
    if shown != COLUMNS:
        lines += ["", "ref: the reference answers' tokens ranked in each config's next-token distribution (teacher "
                  "forcing): unshifted = the model's top token, shifted = ranked below 3rd; log-prob per token in "
                  "nats. " + REFERENCE_NOTE]
    return "\n".join(lines) + "\n"


CHART = ("frame_held", "clean_stop", "copying", "unwarranted_apology", "declined")


def chart(rows: List[Row], path: Path) -> None:
    """Grouped bars of the rate metrics, one group per config (skipped, with a warning, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn(f"{path.name} not drawn: matplotlib is not installed (pip install matplotlib)")
        return
    headings = dict((k, h) for k, h, _ in COLUMNS)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.9 * len(rows)))
    height = 0.8 / len(CHART)
    for j, key in enumerate(CHART):
        values = [100 * (r.metrics[key] or 0) for r in rows]
        ax.barh([i + j * height for i in range(len(rows))], values, height, label=headings[key])
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))], [r.config for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of answers")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    ax.set_title("Judge-free metrics per config")
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def summary(row: Row) -> str:
    """One line per config for the terminal."""
    m = row.metrics
    return (f"{row.config}: frame {_cell(m['frame_held'], True)}, clean stop {_cell(m['clean_stop'], True)}, "
            f"copying {_cell(m['copying'], True)}, apology/refusal on harmless "
            f"{_cell(m['unwarranted_apology'], True)}, harmful declined {_cell(m['declined'], True)}"
            + (f", ref shifted {_cell(m['ref_shifted'], True)}" if "ref_shifted" in m else "")
            + "".join(f", {k} {_cell(v, k.endswith('rate'))}" for k, v in row.judge.items()))
