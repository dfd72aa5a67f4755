"""The report of ``urial-edge shift``: JSON, Markdown, charts and a page of coloured tokens, all in one directory.

- ``report.json``: everything measured; written last, with ``"complete": true``;
- ``report.md``: the shares per condition, the shift rate by position, the most frequent shifted
  tokens with counts, and the shares of every answer;
- ``shares.png``, ``positions.png``, ``top_shifted.png``, ``tokens.png`` (every answer as a row of
  coloured token cells; matplotlib needed, a warning without it);
- ``tokens.html``: each answer's text with every token coloured by its category and its rank,
  probability and the base model's own choice on hover. One self-contained file: inline style,
  no script, no link, nothing fetched, every text escaped.

A run first removes the report files of an earlier one (``report.json`` first) and writes them
again only once every answer is scored, each atomically and ``report.json`` last: a run that
stops part way leaves no ``report.json``, so no partial report passes as complete.
"""

import html
import json
import math
import re
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from ..disk.files import atomic_file, write_text_atomic
from ..log import warn
from ..runtime.detokenizer import StreamingDetokenizer

REPORT_FILES = ("report.json", "report.md", "shares.png", "positions.png", "top_shifted.png", "tokens.png",
                "tokens.html")  # report.json first: once it is gone, nothing left passes as complete
COLOURS = {"unshifted": "#4caf50", "marginal": "#f2c12e", "shifted": "#e05252"}
CHART_TOP = 15
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clear(out: Path) -> None:
    """Remove an earlier run's report files before anything new is scored."""
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)


def write(out: Path, report: dict, views: List[dict]) -> None:
    """Every report file, atomically, ``report.json`` (marked complete) last."""
    write_text_atomic(out / "report.md", markdown(report))
    charts(out, report, views)
    write_text_atomic(out / "tokens.html", page(report, views))
    complete = json.dumps({**report, "complete": True}, indent=1, ensure_ascii=False)
    write_text_atomic(out / "report.json", complete + "\n")


def pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def num(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def shown(token: str) -> str:
    """A token as a quoted string with its white space visible (JSON escapes), for tables and charts."""
    return json.dumps(token, ensure_ascii=False)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    conds = report["conditions"]
    kl = any(c["mean_kl"] is not None for c in conds)
    lines = [f"# Token distribution shift: {report['base_model']}", "", *[f"- {n}" for n in report["notes"]], "",
             "## Shares per condition", "",
             "| condition | prefix tokens | answers | tokens | unshifted | marginal | shifted | mean log-prob |"
             + (" mean KL |" if kl else ""), "|---" * (8 + kl) + "|"]
    for c in conds:
        lines.append(f"| {_md(c['condition'])} | {c['prefix_tokens']} | {c['answers']} | {c['tokens']} | "
                     f"{pct(c['unshifted'])} | {pct(c['marginal'])} | {pct(c['shifted'])} | "
                     f"{num(c['mean_logprob'])} |" + (f" {num(c['mean_kl'], 3)} |" if kl else ""))
    lines += ["", "Shares are over all answer tokens; mean log-prob is per token (natural log)"
              + (", mean KL is KL(aligned || base) per token in nats." if kl else "."), ""]
    lines += _position_table(conds) + _top_tables(conds) + _answer_table(conds)
    return "\n".join(lines) + "\n"


def _position_table(conds: Sequence[dict]) -> List[str]:
    bins = max((c["by_position"] for c in conds), key=len)
    lines = ["## Shifted share by token position", "",
             "| positions | answers reaching | " + " | ".join(_md(c["condition"]) for c in conds) + " |",
             "|---" * (2 + len(conds)) + "|"]
    for k, b in enumerate(bins):
        cells = [pct(c["by_position"][k]["shifted"]) if k < len(c["by_position"]) else "-" for c in conds]
        lines.append(f"| {b['from']}-{b['to']} | {b['answers']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _top_tables(conds: Sequence[dict]) -> List[str]:
    lines = ["## Most frequent shifted tokens", ""]
    for c in conds:
        lines += [f"### {c['condition']}", "", "| token | count | share of shifted | base model's top token instead |",
                  "|---|---|---|---|"]
        lines += [f"| {_md(shown(t['token']))} | {t['count']} | {pct(t['share'])} | {_md(shown(t['instead']))} |"
                  for t in c["top_shifted"]]
        lines.append("")
    return lines


def _answer_table(conds: Sequence[dict]) -> List[str]:
    lines = ["## Per answer: shifted (unshifted)", "",
             "| id | tokens | " + " | ".join(_md(c["condition"]) for c in conds) + " |",
             "|---" * (2 + len(conds)) + "|"]
    for k, a in enumerate(conds[0]["per_answer"]):
        cells = [f"{pct(c['per_answer'][k]['shifted'])} ({pct(c['per_answer'][k]['unshifted'])})" for c in conds]
        lines.append(f"| {_md(str(a['id']))} | {a['tokens']} | " + " | ".join(cells) + " |")
    return lines


# -- the token view ------------------------------------------------------------------------------------


def token_views(items, records_by_condition: Sequence[Sequence[dict]], names: Sequence[str], tokenizer,
                decode: Callable[[int], str]) -> List[dict]:
    """Per answer and condition, the answer's text cut into the pieces its tokens add, with their scores.

    A character split over several byte tokens shows with the token that completes it.
    """
    views = []
    for k, item in enumerate(items):
        view = {"id": item.id, "query": item.query, "conditions": []}
        for name, records in zip(names, records_by_condition):
            rec = records[k]
            text = StreamingDetokenizer(tokenizer)
            pieces = [text.add(t) for t in rec["tokens"]]
            pieces[-1] += text.flush()
            kl = rec.get("kl") or [None] * len(pieces)
            view["conditions"].append({"name": name, "tokens": [
                (piece, rank, lp, decode(top), tlp, d) for piece, rank, lp, top, tlp, d in
                zip(pieces, rec["ranks"], rec["logprobs"], rec["top_ids"], rec["top_logprobs"], kl)]})
        views.append(view)
    return views


def _esc(text: str) -> str:
    return html.escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text), quote=True)


def _span(piece: str, rank: int, logprob: float, top: str, top_logprob: float, kl: Optional[float]) -> str:
    cls = "u" if rank == 1 else "m" if rank <= 3 else "s"
    title = f"rank {rank}, p {math.exp(logprob):.3g}; base top {shown(top)} p {math.exp(top_logprob):.3g}"
    if kl is not None:
        title += f"; KL {kl:.3g}"
    return f'<span class="{cls}" title="{_esc(title)}">{_esc(piece)}</span>' if piece else ""


STYLE = """body{font:15px/1.5 system-ui,sans-serif;margin:2em auto;max-width:62em;padding:0 1em;color:#222}
.a{white-space:pre-wrap;font:13px/1.6 ui-monospace,monospace;border:1px solid #ddd;padding:.6em;border-radius:4px}
.u{background:#d8f0d8}.m{background:#fbe8a6}.s{background:#f5baba}.q{white-space:pre-wrap;color:#444}
table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}summary{cursor:pointer;margin:.4em 0}
h3{font-size:1em;margin:.8em 0 .3em}"""


def page(report: dict, views: Sequence[dict]) -> str:
    """The coloured-token page: one HTML file, nothing external."""
    conds = report["conditions"]
    rows = "".join(f"<tr><td>{_esc(c['condition'])}</td><td>{c['tokens']}</td><td>{pct(c['unshifted'])}</td>"
                   f"<td>{pct(c['marginal'])}</td><td>{pct(c['shifted'])}</td></tr>" for c in conds)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Token distribution shift: {_esc(report['base_model'])}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Token distribution shift: {_esc(report['base_model'])}</h1>",
             "".join(f"<p>{_esc(n)}</p>" for n in report["notes"]),
             '<p>Each answer token is coloured by where it ranks in the base model\'s next-token distribution: '
             '<span class="u">unshifted</span> (rank 1), <span class="m">marginal</span> (rank 2-3), '
             '<span class="s">shifted</span> (rank above 3). Point at a token for its rank and probability and '
             "the base model's own top token.</p>",
             f"<table><tr><th>condition</th><th>tokens</th><th>unshifted</th><th>marginal</th><th>shifted</th></tr>"
             f"{rows}</table>"]
    for k, view in enumerate(views):
        shifted = ", ".join(f"{_esc(c['condition'])} {pct(c['per_answer'][k]['shifted'])}" for c in conds)
        query = view["query"] if len(view["query"]) <= 110 else view["query"][:110] + "\u2026"
        parts.append(f"<details{' open' if k == 0 else ''}><summary>#{_esc(str(view['id']))}: {_esc(query)} "
                     f"(shifted: {shifted})</summary><p class=\"q\">{_esc(view['query'])}</p>")
        for c, cond in zip(view["conditions"], conds):
            s = cond["per_answer"][k]
            parts.append(f"<h3>{_esc(c['name'])}: unshifted {pct(s['unshifted'])}, marginal {pct(s['marginal'])}, "
                         f"shifted {pct(s['shifted'])}</h3><div class=\"a\">"
                         + "".join(_span(*t) for t in c["tokens"]) + "</div>")
        parts.append("</details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# -- charts ----------------------------------------------------------------------------------------------


def charts(out: Path, report: dict, views: Sequence[dict]) -> None:
    """The four PNG charts (skipped, with a warning, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn("charts not drawn: matplotlib is not installed (pip install matplotlib)")
        return
    conds = report["conditions"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs a font lacks (emoji, CJK in token labels)
        for name, draw in (("shares.png", _shares_chart), ("positions.png", _positions_chart),
                           ("top_shifted.png", _top_chart)):
            _save(plt, draw(plt, conds, report["base_model"]), out / name)
        _save(plt, _tokens_chart(plt, conds, views), out / "tokens.png")


def _save(plt, fig, path: Path) -> None:
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def share_bars(ax, conds: Sequence[dict]) -> None:
    """One stacked bar per condition: its unshifted, marginal and shifted shares (also drawn by benchmarks/)."""
    left = [0.0] * len(conds)
    for cat in ("unshifted", "marginal", "shifted"):
        values = [100 * (c[cat] or 0) for c in conds]
        ax.barh(range(len(conds)), values, left=left, color=COLOURS[cat], label=cat)
        for i, (v, x) in enumerate(zip(values, left)):
            if v >= 4:
                ax.text(x + v / 2, i, f"{v:.1f}%", ha="center", va="center", fontsize=8)
        left = [x + v for x, v in zip(left, values)]
    ax.set_yticks(range(len(conds)), [c["condition"] for c in conds])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of answer tokens")


def _shares_chart(plt, conds, title):
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.55 * len(conds)))
    share_bars(ax, conds)
    ax.set_title(f"Token shift of the answers under {title}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    return fig


def _positions_chart(plt, conds, title):
    fig, ax = plt.subplots(figsize=(9, 4))
    for c in conds:
        enough = max(3, c["answers"] // 10)  # bins few answers reach are noise
        bins = [b for b in c["by_position"] if b["answers"] >= enough]
        ax.plot([(b["from"] + b["to"]) / 2 for b in bins], [100 * b["shifted"] for b in bins], marker=".",
                label=c["condition"])
    ax.set_xlabel("token position in the answer")
    ax.set_ylabel("% shifted (rank > 3)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Shifted share by position under {title}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _top_chart(plt, conds, title):
    cols = min(3, len(conds))
    rows = math.ceil(len(conds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.5 + 0.22 * CHART_TOP * rows), squeeze=False)
    for ax, c in zip(axes.flat, conds):
        top = c["top_shifted"][:CHART_TOP]
        ax.barh(range(len(top)), [t["count"] for t in top], color=COLOURS["shifted"])
        ax.set_yticks(range(len(top)), [shown(t["token"]) for t in top], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(c["condition"], fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(conds):]:
        ax.axis("off")
    fig.suptitle("Most frequent shifted tokens (count)")
    fig.tight_layout()
    return fig


def _tokens_chart(plt, conds, views):
    """Every answer as a row of cells, one per token, coloured by category: where in the answers shifts fall."""
    from matplotlib.colors import ListedColormap
    import numpy as np

    width = min(600, max(len(c["tokens"]) for v in views for c in v["conditions"]))
    fig, axes = plt.subplots(len(conds), 1, figsize=(10, 0.6 + (0.9 + 0.045 * len(views)) * len(conds)),
                             squeeze=False)
    cmap = ListedColormap(["#ffffff", COLOURS["unshifted"], COLOURS["marginal"], COLOURS["shifted"]])
    for k, (ax, c) in enumerate(zip(axes[:, 0], conds)):
        grid = np.zeros((len(views), width))
        for row, view in enumerate(views):
            ranks = [t[1] for t in view["conditions"][k]["tokens"]][:width]
            grid[row, :len(ranks)] = [1 if r == 1 else 2 if r <= 3 else 3 for r in ranks]
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=3, aspect="auto", interpolation="nearest")
        ax.set_title(f"{c['condition']}: each row an answer, each cell a token", fontsize=9)
        ax.set_yticks([])
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("token position (green unshifted, yellow marginal, red shifted)")
    fig.tight_layout()
    return fig
