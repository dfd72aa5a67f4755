"""The token-distribution-shift analysis (Lin et al., ICLR 2024, section 2): how far a base model is from answers.

For each query and a given answer (an aligned model's, or a reference written by
hand), the base model reads the query in the URIAL frame and then the answer,
token by token (teacher forcing, ``runtime/scoring.py``), and each answer token is
put in one of three categories by its rank in the base model's next-token
distribution:

- **unshifted**: rank 1, the base model's own top token;
- **marginal**: rank 2 or 3;
- **shifted**: rank above 3.

A *condition* is what comes before the query: ``none`` (the bare query: the
model's BOS, then only the query block and the opening of the answer block,
no instruction and no examples, as the authors gave the plain query) or a URIAL
prompt, whose prefix state is cached and shared by every answer. The fewer
tokens a prompt leaves shifted, the closer it brings the base model to the
answers. Answer text is fed as the frame renders a finished turn: lines that
would break the frame get its escaping backslash, and those are scored too.

Scores go to ``scores.jsonl`` in the output directory one answer at a time
(each line keyed by everything that changes it), so an interrupted run resumes;
``eval/shift_report.py`` writes the report from them.
"""

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..disk.paths import ensure_dir, package_data
from ..disk.results import append_results, read_results
from ..errors import UrialError
from ..model.loading import context_length, load_model
from ..model.store import model_fingerprint, resolve_model
from ..model.tokenizer import Tokenizer, file_digest
from ..runtime import prompt as urial
from ..runtime.assistant import Assistant
from ..runtime.chat_template import ChatTemplate
from ..runtime.engine import Request
from ..runtime.options import GenerationOptions
from ..runtime.scoring import Scored, Scorer, TokenScores, batches, score
from .questions import Id

NONE = "none"
CATEGORIES = ("unshifted", "marginal", "shifted")
MARGINAL_RANK = 3  # ranks 2..3 are marginal, above it shifted
POSITION_BIN = 10  # answer positions per bin of the shift-by-position table
TOP_TOKENS = 20
SCORES, ALIGNED = "scores.jsonl", "aligned.jsonl"


def category(rank: int) -> str:
    return "unshifted" if rank == 1 else "marginal" if rank <= MARGINAL_RANK else "shifted"


def default_references() -> Path:
    """Our own reference answers to the first turns of our question set, shipped with the package."""
    return package_data("eval", "references.jsonl")


@dataclass
class Item:
    """A query and the answer to score; ``line`` is where it was read (0 for a generated answer)."""

    id: Id
    query: str
    answer: str = ""
    line: int = 0


def load_items(path: Path, answers: bool = True) -> List[Item]:
    """``{"id", "query", "answer"}`` lines (``answer`` optional when ``answers`` is False); bad lines are
    one-line errors that name them, found before anything is scored."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise UrialError(f"cannot read {path}: {e.strerror}") from None
    items: List[Item] = []
    seen = set()
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise UrialError(f"{path}:{number}: not valid JSON") from None
        problem = _item_problem(record, answers)
        if problem is None and record["id"] in seen:
            problem = f"duplicate id {record['id']!r}"
        if problem:
            raise UrialError(f"{path}:{number}: {problem}")
        seen.add(record["id"])
        items.append(Item(record["id"], record["query"], record.get("answer", "") if answers else "", number))
    if not items:
        raise UrialError(f"{path} has no queries")
    return items


def _item_problem(record, answers: bool) -> Optional[str]:
    if not isinstance(record, dict):
        return "not a JSON object"
    for key in ("id", "query") + (("answer",) if answers else ()):
        if key not in record:
            return f"missing field {key!r}"
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
        return "'id' must be a string or an integer"
    if not isinstance(record["query"], str) or not record["query"].strip():
        return "'query' must be a non-empty string"
    if answers and (not isinstance(record["answer"], str) or not record["answer"].strip()):
        return "the answer is empty" if isinstance(record["answer"], str) else "'answer' must be a string"
    return None


@dataclass
class Condition:
    """What precedes the query: nothing (``none``) or a URIAL prompt."""

    name: str
    prompt: Optional[urial.Prompt] = None


def conditions(specs: Sequence[str]) -> List[Condition]:
    """``none`` or prompt names/files, loaded now so that a bad one fails before any work."""
    found = [Condition(NONE) if s == NONE else Condition(urial.load_prompt(s).name, urial.load_prompt(s))
             for s in specs]
    names = [c.name for c in found]
    if len(set(names)) < len(names):
        raise UrialError(f"the condition {next(n for n in names if names.count(n) > 1)!r} is given twice")
    return found


class Base:
    """A model loaded once for the whole analysis; each condition's prompt shares its weights."""

    def __init__(self, spec: Optional[str], batch_size: int = 8):
        self.path = resolve_model(spec)
        self.model, self.config = load_model(self.path)
        self.tokenizer = Tokenizer(self.path)
        self.scorer = Scorer(self.model)
        self.context = context_length(self.config)
        self.model_id = model_fingerprint(self.path)
        self.label = self.path.name
        self.batch_size = batch_size
        self._bots: Dict[str, Assistant] = {}

    def assistant(self, prompt: urial.Prompt) -> Assistant:
        """The model with ``prompt``'s prefix (its state is loaded or built on first use)."""
        if prompt.name not in self._bots:
            self._bots[prompt.name] = Assistant(self.model, self.config, self.tokenizer, self.path, prompt,
                                                GenerationOptions(), batch_size=self.batch_size)
        return self._bots[prompt.name]


@dataclass
class Prepared:
    """One condition's sequences, tokenized and checked, ready to score from its starting state."""

    condition: Condition
    prefix: List[int]  # the token ids the starting state holds (none: no state)
    seqs: List[Scored]
    keys: List[str]
    state: Callable[[], Optional[list]] = field(repr=False, default=lambda: None)


def framed_ids(encode: Callable[[str], List[int]], query: str, answer: str) -> Tuple[List[int], List[int]]:
    """The query's frame and the answer's tokens, as one text is tokenized (the answer as a finished turn renders it).

    If the answer's first token merges with the frame's last, scoring starts at the merged token.
    """
    turn = urial.render_turn(query)
    context = encode(turn)
    joint = encode(turn + urial.escape(answer))
    n = urial.common_prefix(context, joint)
    return joint[:n], joint[n:]


def _where(item: Item, source: str) -> str:
    return f"{source}:{item.line}" if item.line else f"answer {item.id!r} of {source}"


def prepare(base: Base, condition: Condition, items: Sequence[Item], source: str,
            other: Optional[str] = None) -> Prepared:
    """Tokenize every item under ``condition``; an answer that does not fit the context is a one-line error.

    ``other`` (the aligned model's identity, when its distribution is compared) enters each line's key.
    """
    if condition.prompt is None:
        prefix, state = [], (lambda: None)
        encode = lambda text: base.tokenizer.encode(text, bos=True)  # noqa: E731
        context_text = NONE
    else:
        bot = base.assistant(condition.prompt)
        prefix, state, encode = bot.prefix_ids, (lambda: bot.prefix.fresh()), bot.after_prefix
        context_text = bot.prefix_text
    seqs, keys = [], []
    for item in items:
        frame, answer = framed_ids(encode, item.query, item.answer)
        used = len(prefix) + len(frame) + len(answer)
        if used > base.context:
            what = "the bare query" if condition.prompt is None else f"the {condition.name} prefix"
            raise UrialError(f"{_where(item, source)}: the answer does not fit: with {what} it needs {used} tokens, "
                             f"the model's context is {base.context}")
        seqs.append(Scored(frame + answer, len(answer)))
        keys.append(_digest([base.model_id, base.tokenizer.fingerprint, context_text, frame, answer, other]))
    return Prepared(condition, prefix, seqs, keys, state)


def _digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def record_id(prefix: str, item: Item) -> str:
    return f"{prefix} #{item.id}"


def score_prepared(base: Base, prepared: Prepared, items: Sequence[Item], path: Path, id_prefix: str,
                   batch_size: int, other: Optional[Tuple[Scorer, List[Scored]]] = None) -> List[dict]:
    """Every item's token scores under one condition, from ``path`` where already there, else scored and appended."""
    records = read_results(path)
    ids = [record_id(id_prefix, item) for item in items]
    todo = [i for i, key in enumerate(prepared.keys) if records.get(ids[i], {}).get("key") != key]
    if todo:
        seqs = [prepared.seqs[i] for i in todo]
        theirs = (other[0], [other[1][i] for i in todo]) if other is not None else None
        order = [todo[j] for group in batches(seqs, batch_size) for j in group]
        scored = score(base.scorer, seqs, prepared.state(), batch_size, theirs)

        def lines():
            for (j, scores), i in zip(scored, order):
                assert todo[j] == i  # score() yields in batches() order
                record = _record(prepared.condition.name, items[i], prepared.keys[i], prepared.seqs[i], scores)
                records[ids[i]] = {"id": ids[i], **record}
                yield record

        append_results(path, [ids[i] for i in order], lines(), label=f"scoring {prepared.condition.name}")
    return [records[i] for i in ids]


def _record(condition: str, item: Item, key: str, seq: Scored, s: TokenScores) -> dict:
    record = {"condition": condition, "item": item.id, "key": key, "tokens": seq.tokens[-seq.answer:],
              "ranks": s.ranks, "logprobs": [round(x, 5) for x in s.logprobs], "top_ids": s.top_ids,
              "top_logprobs": [round(x, 5) for x in s.top_logprobs]}
    if s.kl is not None:
        record["kl"] = [round(max(x, 0.0), 5) for x in s.kl]
    return record


# -- answers from an aligned model ----------------------------------------------------------------


class Aligned(Base):
    """An instruction-tuned model: its answers through its own chat template, and its distributions for KL."""

    def __init__(self, spec: str, batch_size: int = 8):
        super().__init__(spec, batch_size)
        self.template = ChatTemplate.of_model(self.path, self.label)
        self.bot = self.assistant(urial.Prompt(NONE, ""))  # for its engine only: completions use no prefix

    def prompt_ids(self, query: str) -> List[int]:
        """The template's text before the answer, tokenized as transformers does (its special tokens are in it)."""
        return self.tokenizer.encode(self.template.prompt(query))

    def shares_tokenizer(self, base: Base) -> bool:
        """The same vocabulary and the same logit dimension: then the two distributions can be compared."""
        same = file_digest(self.path / "tokenizer.json") == file_digest(base.path / "tokenizer.json")
        return same and self.scorer.vocab == base.scorer.vocab

    def options(self, max_tokens: int) -> GenerationOptions:
        """Greedy with no repetition penalty (the authors decode aligned answers greedily), stopping at the end
        of the assistant's turn: a token the engine stops at, or text."""
        end = self.template.end_of_turn()
        ids = self.tokenizer.encode(end) if end else []
        stop: Tuple[str, ...] = ()
        if len(ids) == 1:
            self.bot.engine.eos_ids.add(ids[0])  # this model's engine serves only these completions
        elif end:
            stop = (end,)
        return GenerationOptions(max_tokens=max_tokens, temperature=0.0, repetition_penalty=1.0, stop=stop)

    def answer(self, items: Sequence[Item], out: Path, max_tokens: int, batch_size: int) -> List[dict]:
        """Its answer to every query, from ``out/aligned.jsonl`` where already there, else generated and appended."""
        path = out / ALIGNED
        records = read_results(path)
        options = self.options(max_tokens)
        keys = [_digest([self.model_id, self.template.prompt(item.query), options.to_json()]) for item in items]
        todo = [i for i, item in enumerate(items) if records.get(item.id, {}).get("key") != keys[i]]
        requests = []
        for i in todo:
            ids = self.prompt_ids(items[i].query)
            if len(ids) >= self.context:
                raise UrialError(f"query {items[i].id!r}: its chat prompt is {len(ids)} tokens, {self.label}'s "
                                 f"context is {self.context}")
            requests.append(Request(ids, options=options, framed=False))

        def lines():
            for i, answer in zip(todo, self.bot.run(requests, batch_size)):
                record = {"query": items[i].query, "answer": answer.text, "finish_reason": answer.finish_reason,
                          "tokens": answer.tokens, "model": self.label, "key": keys[i]}
                records[items[i].id] = {"id": items[i].id, **record}
                yield record

        if todo:
            append_results(path, [items[i].id for i in todo], lines(), label=f"answering with {self.label}")
        return [records[item.id] for item in items]

    def sequences(self, items: Sequence[Item], prepared: Prepared) -> List[Scored]:
        """Its own prompt followed by the answer tokens the base model scores (shared tokenizer only)."""
        return [Scored(self.prompt_ids(item.query) + seq.tokens[-seq.answer:], seq.answer)
                for item, seq in zip(items, prepared.seqs)]


# -- aggregates ---------------------------------------------------------------------------------------


def shares(ranks: Sequence[int]) -> Dict[str, Optional[float]]:
    counts = Counter(category(r) for r in ranks)
    return {c: (counts[c] / len(ranks) if ranks else None) for c in CATEGORIES}


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize(name: str, records: Sequence[dict], decode: Callable[[int], str], prefix_tokens: int) -> dict:
    """One condition's figures: shares over all answer tokens, per answer, by position, and the shifted tokens."""
    ranks = [r for rec in records for r in rec["ranks"]]
    logprobs = [x for rec in records for x in rec["logprobs"]]
    kls = [x for rec in records for x in rec.get("kl", [])]
    summary = {"condition": name, "prefix_tokens": prefix_tokens, "answers": len(records), "tokens": len(ranks),
               **shares(ranks), "mean_logprob": _mean(logprobs), "mean_kl": _mean(kls) if kls else None,
               "per_answer": [_per_answer(rec) for rec in records],
               "by_position": by_position(records), "top_shifted": top_shifted(records, decode)}
    summary["answer_mean_shifted"] = _mean([a["shifted"] for a in summary["per_answer"]])
    return summary


def _per_answer(rec: dict) -> dict:
    out = {"id": rec["item"], "tokens": len(rec["ranks"]), **shares(rec["ranks"]),
           "mean_logprob": _mean(rec["logprobs"])}
    if "kl" in rec:
        out["mean_kl"] = _mean(rec["kl"])
    return out


def by_position(records: Sequence[dict], width: int = POSITION_BIN) -> List[dict]:
    """Shares of the answer tokens at positions 1-10, 11-20, ... (how many answers reach each bin too)."""
    bins: Dict[int, List[int]] = {}
    reach: Counter = Counter()
    for rec in records:
        for k, rank in enumerate(rec["ranks"]):
            bins.setdefault(k // width, []).append(rank)
        for b in range((len(rec["ranks"]) - 1) // width + 1):
            reach[b] += 1
    return [{"from": b * width + 1, "to": (b + 1) * width, "answers": reach[b], "tokens": len(bins[b]),
             **shares(bins[b])} for b in sorted(bins)]


def top_shifted(records: Sequence[dict], decode: Callable[[int], str], n: int = TOP_TOKENS) -> List[dict]:
    """The most frequent shifted tokens (by id), with the base model's most frequent own choice in their place."""
    counts: Counter = Counter()
    instead: Dict[int, Counter] = {}
    for rec in records:
        for token, rank, top in zip(rec["tokens"], rec["ranks"], rec["top_ids"]):
            if rank > MARGINAL_RANK:
                counts[token] += 1
                instead.setdefault(token, Counter())[top] += 1
    total = sum(counts.values())
    return [{"token": decode(t), "id": t, "count": c, "share": c / total,
             "instead": decode(instead[t].most_common(1)[0][0])} for t, c in counts.most_common(n)]


def decoder(tokenizer) -> Callable[[int], str]:
    """One token's text, remembered (the same few ids come up again and again)."""
    memo: Dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in memo:
            memo[token] = tokenizer.decode([token])
        return memo[token]

    return decode


# -- a whole analysis ------------------------------------------------------------------------------------


RANK_RULE = ("rank = 1 + the number of vocabulary entries whose logit is strictly greater than the answer "
             "token's (ties do not count against it); the base model's top token is the first highest-scoring id")


def analyse(references: Optional[Path], out: Path, model: Optional[str] = None, specs: Sequence[str] = (),
            aligned: Optional[str] = None, max_tokens: int = 512, batch_size: int = 8) -> dict:
    """``urial-edge shift``: score every answer under every condition and write the report into ``out``."""
    from . import shift_report

    source = references or default_references()
    items = load_items(source, answers=aligned is None)
    conds = conditions(specs or (NONE, urial.DEFAULT_PROMPT))
    if out.exists() and not out.is_dir():
        raise UrialError(f"{out} is not a directory")
    ensure_dir(out)
    base = Base(model, batch_size)
    notes = [f"Base model {base.label}; " + ("the bare query (condition none) is the model's BOS, then only the "
             "query block and the opening of the answer block of the URIAL frame, with no instruction and no "
             "examples; " if any(c.prompt is None for c in conds) else "") + f"{RANK_RULE}."]
    helper, shared = None, False
    if aligned is not None:
        helper = Aligned(aligned, batch_size)
        shared = helper.shares_tokenizer(base)
        items, answer_notes = _aligned_items(helper, base, shared, items, out, max_tokens, batch_size, source)
        notes += answer_notes
    else:
        notes.append(f"Answers: {len(items)} from {source}, given as text and tokenized with {base.label}'s "
                     "tokenizer.")
    other = helper.model_id if shared else None
    prepared = [prepare(base, c, items, helper.label if helper else str(source), other) for c in conds]
    shift_report.clear(out)
    decode = decoder(base.tokenizer)
    summaries, all_records = [], []
    for p in prepared:
        theirs = (helper.scorer, helper.sequences(items, p)) if shared else None
        records = score_prepared(base, p, items, out / SCORES, p.condition.name, batch_size, theirs)
        all_records.append(records)
        summaries.append(summarize(p.condition.name, records, decode, len(p.prefix)))
    report = {"format": 1, "base_model": base.label, "base_model_path": str(base.path),
              "answers": {"source": str(source) if helper is None else helper.label, "count": len(items),
                          "aligned_model": helper.label if helper else None,
                          "retokenized": helper is not None and not shared, "kl": shared},
              "categories": {"unshifted": "rank 1", "marginal": f"rank 2-{MARGINAL_RANK}",
                             "shifted": f"rank above {MARGINAL_RANK}"},
              "rank_rule": RANK_RULE, "notes": notes, "conditions": summaries}
    views = shift_report.token_views(items, all_records, [c.name for c in conds], base.tokenizer, decode)
    shift_report.write(out, report, views)
    return report


def _aligned_items(helper: Aligned, base: Base, shared: bool, items: List[Item], out: Path, max_tokens: int,
                   batch_size: int, source: Path) -> Tuple[List[Item], List[str]]:
    """The aligned model's answers as items to score, and what the report says about them."""
    answers = helper.answer(items, out, max_tokens, batch_size)
    kept = [Item(i.id, i.query, a["answer"]) for i, a in zip(items, answers) if a["answer"].strip()]
    empty = len(items) - len(kept)
    cut = sum(a["finish_reason"] == "length" for a in answers)
    if not kept:
        raise UrialError(f"{helper.label} gave only empty answers")
    how = (f"{helper.label} shares {base.label}'s tokenizer: the text of its answers is tokenized with it (giving "
           "its own tokens back unless it generated an unusual split), and KL(aligned || base) compares the two "
           "distributions at every answer position" if shared else
           f"{helper.label} has another tokenizer: the text of its answers was re-tokenized with {base.label}'s "
           f"({sum(a['tokens'] for a in answers)} tokens of {helper.label}), and there is no KL divergence")
    notes = [f"Answers: {helper.label}'s own, to the {len(items)} queries of {source}, generated greedily (no "
             f"repetition penalty, at most {max_tokens} tokens) through its chat template; {how}."]
    if empty or cut:
        notes.append(f"{empty} empty answers left out; {cut} answers stopped at the {max_tokens}-token limit "
                     "(scored as they are).")
    return kept, notes


# -- eval --reference ---------------------------------------------------------------------------------------


REFERENCES = "references.jsonl"
REFERENCE_NOTE = ("Reference scores depend on the model and the prompt only: decoding settings (temperature, top-p, "
                  "repetition penalty, seed, max tokens) change how text is sampled from the model's distribution, "
                  "not the distribution the reference tokens are ranked in, so configs that differ only in them share "
                  "their reference scores.")


def reference_metrics(configs, path: Path, items: Sequence[Item], out: Path, batch_size: int = 8) -> Dict[str, dict]:
    """For ``eval --reference``: each config's unshifted and shifted shares and mean log-prob per token of the
    reference answers (``items``, read from ``path``), scored once per model and prompt into
    ``out/references.jsonl`` (resumable)."""
    groups: Dict[tuple, list] = {}
    for c in configs:
        groups.setdefault((c.model, c.prompt), []).append(c)
    found: Dict[str, dict] = {}
    bases: Dict[Optional[str], Base] = {}
    for (model, prompt), group in groups.items():
        if model not in bases:
            bases.clear()  # one base model in memory at a time
            bases[model] = Base(model, batch_size)
        base = bases[model]
        condition = conditions([prompt or urial.DEFAULT_PROMPT])[0]
        prepared = prepare(base, condition, items, str(path))
        records = score_prepared(base, prepared, items, out / REFERENCES, f"{group[0].model_label} / "
                                 f"{condition.name}", batch_size)
        figures = summarize(condition.name, records, decoder(base.tokenizer), len(prepared.prefix))
        for c in group:
            found[c.name] = {"ref_unshifted": figures["unshifted"], "ref_shifted": figures["shifted"],
                             "ref_logprob": figures["mean_logprob"]}
    return found
