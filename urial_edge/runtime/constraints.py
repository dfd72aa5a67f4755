"""Structured output: what an answer must look like, checked before generation and enforced token by token.

A :class:`Constraint` is one of the kinds declared in :data:`KINDS` (add a kind there and nowhere else: the
Python keywords, the command-line options and the server's ``response_format`` types derive from it):

- ``schema``: a JSON Schema (``{"type": "object"}`` is "any JSON object"; the answer is parsed as JSON);
- ``regex``: a regular expression the whole answer matches;
- ``choice``: one of a few strings;
- ``grammar``: a context-free grammar in llguidance's Lark syntax, or llama.cpp's GBNF (converted to Lark).

Each is compiled to an llguidance grammar and validated when it is made (about a millisecond), so an invalid
schema, regex or grammar, or a schema feature the engine does not support, is a one-line :class:`UrialError`
naming it before anything is generated. Every answer that carries a constraint gets a :class:`Guide`, the
matcher state the engine drives: the tokens allowed next (a bitmask, applied to that row's logits in
``sampling.apply_masks``), the tokens the grammar forces (fed without a decode step each, see engine.py), and
whether the output is complete. Inside the URIAL frame the grammar is followed by the answer block's closing
fence, so the base model ends a constrained answer the way it ends any other (a base model rarely picks EOS
where a grammar could go on, e.g. after the digits of ``[0-9]+``); the fence is not part of the answer.

Why llguidance. We compared it with xgrammar 0.2.9 and outlines-core 0.2.14 on this machine (2 cores, Linux,
MLX on the CPU, Gemma 3's 262k-token vocabulary; /tmp/work/constraints/REPORT.md, and our own checks):

- compiling a schema: llguidance ~1 ms, xgrammar 60-95 ms, outlines-core 5-14 s (49 s for "any JSON object");
- a mask per token: ~0.02-0.06 ms of CPU for llguidance and xgrammar, 0.2-0.8 ms for outlines-core;
- features: llguidance enforced every JSON Schema feature we tried (nested objects, arrays with min/maxItems,
  enum, const, number bounds, optional fields, additionalProperties, pattern, formats, anyOf/oneOf/allOf,
  recursive $ref), plus regex, choice, Lark and GBNF; xgrammar accepts allOf and unknown formats without
  enforcing them; outlines-core ignores number bounds, has no CFG and drops valid continuations after an
  accepting state (after ``0`` in ``[0-9]+(\\.[0-9]+)?`` it forbids ``.``);
- forced tokens: llguidance's ``compute_ff_tokens`` are exactly the tokens its own masks force one by one, so
  fast-forward equals token-by-token decoding; xgrammar's jump-forward strings tokenize differently from its
  masks (3-106 tokens allowed where it "forces" one); outlines-core has none;
- errors: llguidance names the problem (``Unknown format: color``, ``minimum (5) is greater than maximum (1)``)
  without raising mid-generation; xgrammar's messages carry C++ source paths;
- packaging: one 3 MB MIT wheel (abi3, Linux x86_64/aarch64, macOS arm64) with no dependencies; xgrammar needs
  torch, transformers and triton (3 s to import). llama.cpp, vLLM, SGLang and OpenAI use llguidance too.

Its cost is the tokenizer object. Built from tokenizer.json (the library's own path, which ``llguidance.hf``
takes after transformers has loaded, itself seconds more) it takes 3-4 s for Gemma's vocabulary on an idle
machine. It cannot be pickled, so it is built once per process, when a constraint is first used, and the one
thing that can be kept is kept in the store: the token table that build derives
(``tokenizers/<key>.llguidance-*.npz``, 2.8 MB). Later processes build from that table: 1.2 s of CPU against
4.3 s the first time (measured here, wall time being meaningless on this shared machine: 6.5 s and 25 s).
The library is imported only then, so ``--help`` and unconstrained answers never load it.
"""

import functools
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..disk.files import atomic_file
from ..disk.paths import tokenizers_dir
from ..errors import UrialError, one_line
from ..log import warn
from . import prompt as urial
from . import validate

CLOSING = "\n" + urial.FENCE  # what ends an answer block of the URIAL frame
# one line, as a script's parser expects; a schema's own "x-guidance" overrides these
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CHOICES = 1024
# JSON Schema keywords a grammar cannot enforce are refused, unless the schema says "lenient" (llguidance's option)
UNENFORCED = ("Unimplemented keys", "Unknown format")
LENIENT = '"x-guidance": {"lenient": true}'
DESCRIBE = ("query", "system", "both", "none")  # where a schema's field descriptions go in the prompt
# measured best on the bundled model (README, benchmarks/results/structured.md): in a system text, the most
# answers complete (50 of 53) and as many fields are right as with no descriptions (147 of 332 each),
# where after the query 113 are
DEFAULT_DESCRIBE = "system"


@functools.lru_cache(maxsize=None)
def _library():
    """llguidance, imported on first use (it is not needed for --help or unconstrained answers)."""
    import llguidance
    import llguidance.numpy  # noqa: F401  (the mask helpers)

    return llguidance


# -- the kinds -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One kind of constraint, declared once.

    ``name`` is the keyword of ``Assistant.ask``/``stream``/``request`` and ``flag`` the command-line
    option; ``response_type`` is its ``response_format`` type on the server, and the key holding the spec
    there. ``read`` turns the option's text into a spec, ``check`` any spec into its normal form and
    ``compile`` that into an llguidance grammar; ``json`` kinds' answers are parsed.
    """

    name: str
    flag: str
    metavar: str
    help: str
    response_type: str
    read: Callable[[str], Any]
    check: Callable[[Any], Any]
    compile: Callable[[Any], str]
    json: bool = False
    multiple: bool = False


def _read_file(path: str, what: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UrialError(f"cannot read {what} file {path}: {getattr(e, 'strerror', None) or one_line(e)}") from None


def _read_schema(value: str) -> Any:
    """``--schema``: JSON text, or the name of a file holding it."""
    text = value if value.lstrip().startswith("{") else _read_file(value, "schema")
    return validate.loads(text, "the schema")


def _check_schema(schema: Any) -> dict:
    if hasattr(schema, "model_json_schema"):  # a pydantic model class
        schema = schema.model_json_schema()
    if isinstance(schema, (str, bytes)):
        schema = validate.loads(schema, "the schema")
    if not isinstance(schema, dict):
        raise UrialError(f"a schema must be a JSON object, got {type(schema).__name__}")
    return schema


def _compile_schema(schema: dict) -> str:
    return _library().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)


def _check_regex(pattern: Any) -> str:
    validate.text(pattern, "a regex")
    if not pattern:
        raise UrialError("the regex is empty")
    return pattern


def _check_choice(options: Any) -> Tuple[str, ...]:
    options = (options,) if isinstance(options, str) else options
    if not isinstance(options, (list, tuple)) or not options:
        raise UrialError("a choice needs a non-empty list of strings")
    if len(options) > MAX_CHOICES:
        raise UrialError(f"a choice takes at most {MAX_CHOICES} strings, got {len(options)}")
    for o in options:
        if not validate.text(o, "each choice"):
            raise UrialError("a choice must not be empty")
    return tuple(options)


def _check_grammar(text: Any) -> str:
    """A Lark grammar as llguidance reads it; GBNF (llama.cpp) is detected and converted."""
    if isinstance(text, tuple):  # (text, syntax), from a file whose extension names it
        text, syntax = text
    else:
        syntax = "auto"
    if not validate.text(text, "a grammar").strip():
        raise UrialError("the grammar is empty")
    from llguidance.gbnf_to_lark import any_to_lark, gbnf_to_lark

    try:
        return gbnf_to_lark(text) if syntax == "gbnf" else any_to_lark(text)
    except Exception as e:  # the converter raises GbnfToLarkError, and bare Exceptions for some rules
        raise UrialError(f"GBNF: {one_line(e)}") from None


def _read_grammar(path: str) -> Tuple[str, str]:
    return _read_file(path, "grammar"), "gbnf" if path.lower().endswith(".gbnf") else "auto"


KINDS: Dict[str, Kind] = {k.name: k for k in (
    Kind("schema", "--schema", "FILE|JSON", "Answer with JSON valid under this JSON Schema (a file or the JSON "
         "itself; '{\"type\": \"object\"}' is any JSON object).", "json_schema", _read_schema, _check_schema,
         _compile_schema, json=True),
    Kind("regex", "--regex", "REGEX", "Answer with text the regular expression matches in full.", "regex", str,
         _check_regex, lambda p: _library().grammar_from("regex", p)),
    Kind("choice", "--choice", "TEXT", "Answer with one of these strings (repeat the option for each).", "choice",
         str, _check_choice, lambda c: _library().grammar_from("choice", list(c)), multiple=True),
    Kind("grammar", "--grammar", "FILE", "Answer in this grammar: Lark (llguidance's syntax) or GBNF (llama.cpp; "
         "detected, or by a .gbnf extension).", "grammar", _read_grammar, _check_grammar,
         lambda text: _library().grammar_from("lark", text)),
)}


# -- a constraint ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """A checked, compiled constraint: ``kind`` (a key of :data:`KINDS`), its ``spec`` in normal form, and
    ``grammar``, llguidance's grammar for it (validated)."""

    kind: str
    spec: Any = field(hash=False)
    grammar: str = field(repr=False)

    def grammar_for(self, framed: bool) -> str:
        """The grammar an answer follows: in the URIAL frame, the answer then its block's closing fence."""
        if not framed:
            return self.grammar
        body = _grammar_list(self.grammar)
        body[0] = {**body[0], "name": "answer"}
        return json.dumps({"grammars": [{"lark_grammar": f"start: @answer {json.dumps(CLOSING)}"}] + body})

    def value(self, text: str) -> Any:
        """What a complete answer means: the parsed JSON for a schema, the text itself otherwise."""
        return json.loads(text) if KINDS[self.kind].json else text

    def arguments(self) -> dict:
        """The keyword argument that makes this constraint again (plain JSON: what ranks of a split model get)."""
        return {self.kind: list(self.spec) if isinstance(self.spec, tuple) else self.spec}

    @property
    def digest(self) -> str:
        (kind, spec), = self.arguments().items()
        return digest(kind, spec)

    def response_format(self) -> dict:
        """This constraint as a server request's ``response_format`` (what ``ask`` sends to a server)."""
        kind = KINDS[self.kind]
        spec = {"name": "answer", "schema": self.spec} if kind.json else self.arguments()[self.kind]
        return {"type": kind.response_type, kind.response_type: spec}

    def description(self) -> str:
        """The fields a schema asks for, with their descriptions, as text for the model ("" if none)."""
        if not KINDS[self.kind].json or not isinstance(self.spec.get("properties"), dict):
            return ""
        return "Answer with a JSON object with these fields:\n" + "\n".join(_fields(self.spec, self.spec, 0))


def digest(kind: str, spec: Any) -> str:
    """A short digest of a constraint (its kind, and its spec as JSON, as given or made): results files keep it
    with each answer, so that a resumed run with another constraint is refused."""
    return hashlib.sha256(json.dumps({kind: spec}, sort_keys=True).encode()).hexdigest()[:16]


def for_item(schema: Any, constraint: Optional[Constraint]) -> dict:
    """The keyword arguments that constrain one item's answer (a batch line's, an eval question's): its own
    JSON Schema if it has one, else the run's constraint (None: none)."""
    return {"schema": schema} if schema is not None else {"constraint": constraint}


def item_digest(schema: Any, constraint: Optional[Constraint]) -> Optional[str]:
    """The digest the answer of :func:`for_item`'s item records (what a resumed run is checked against)."""
    return digest("schema", schema) if schema is not None else constraint and constraint.digest


def make(kind: str, spec: Any) -> Constraint:
    """A constraint of ``kind`` (see :data:`KINDS`), checked and compiled; a one-line UrialError naming the
    kind if the spec is invalid or uses a feature the engine does not support."""
    declared = KINDS.get(kind)
    if declared is None:
        raise UrialError(f"unknown constraint {kind!r}; constraints: {', '.join(KINDS)}")
    try:
        spec = declared.check(spec)
        grammar = declared.compile(spec)
    except (ValueError, TypeError) as e:  # the library's own checks of its arguments
        raise UrialError(f"invalid {declared.name}: {one_line(e)}") from None
    except UrialError as e:
        raise UrialError(f"invalid {declared.name}: {e}") from None
    error, messages = _library().LLMatcher.validate_grammar_with_warnings(grammar)
    if error:
        problem = _first_problem(messages[0])
        if declared.json and problem.startswith(UNENFORCED):
            problem += f" ({LENIENT} in the schema accepts it without enforcing it)"
        raise UrialError(f"invalid {declared.name}: {problem}")
    for message in messages:  # e.g. what a lenient schema asks for but the grammar cannot enforce
        warn(f"{declared.name}: {_first_problem(message)}, not enforced")
    return Constraint(kind, spec, grammar)


def json_object() -> Constraint:
    """Any JSON object (OpenAI's ``{"type": "json_object"}``, Ollama's ``"json"``)."""
    return make("schema", {"type": "object"})


def pop_constraint(options: dict) -> Optional[Constraint]:
    """Take the constraint out of keyword arguments: ``constraint=`` (made already) or one of
    ``schema=``, ``regex=``, ``choice=``, ``grammar=`` (None: not given). At most one may be given."""
    given = {k: options.pop(k) for k in ("constraint", *KINDS) if k in options}
    given = {k: v for k, v in given.items() if v is not None and v != ()}
    if len(given) > 1:
        raise UrialError(f"give one constraint, not {' and '.join(given)}")
    if not given:
        return None
    (kind, spec), = given.items()
    if kind == "constraint":
        if not isinstance(spec, Constraint):
            raise UrialError(f"constraint must be a Constraint, got {type(spec).__name__}")
        return spec
    return make(kind, spec)


def from_response_format(value: Any) -> Optional[Constraint]:
    """A request's ``response_format`` (OpenAI's ``text``, ``json_object`` and ``json_schema``, and one type per
    other kind: ``{"type": "regex", "regex": ...}``, ``choice``, ``grammar``); None for text."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise UrialError("must be an object with a 'type'")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    declared = next((k for k in KINDS.values() if k.response_type == kind), None)
    if declared is None:
        types = ", ".join(["text", "json_object"] + [k.response_type for k in KINDS.values()])
        raise UrialError(f"unknown type {kind!r}; types: {types}")
    spec = value.get(declared.response_type)
    if declared.json:  # OpenAI's {"name": ..., "schema": {...}, "strict": ...}
        if not isinstance(spec, dict) or "schema" not in spec:
            raise UrialError(f"'{declared.response_type}' must be an object with a 'schema'")
        spec = spec["schema"]
    return make(declared.name, spec)


def with_description(constraint: Optional[Constraint], describe: str, query: str, system: str) -> Tuple[str, str]:
    """``query`` and ``system`` with a schema's field descriptions added where ``describe`` says (see
    :data:`DESCRIBE`): after the query, or after the system text (an instruction block after the cached
    prefix), or both. The grammar enforces the shape; the descriptions tell the model what goes in it."""
    if describe not in DESCRIBE:
        raise UrialError(f"describe must be one of {', '.join(DESCRIBE)}, got {describe!r}")
    text = constraint.description() if constraint is not None else ""
    if not text or describe == "none":
        return query, system
    if describe in ("query", "both"):
        query = f"{query}\n\n{text}"
    if describe in ("system", "both"):
        system = f"{system.strip()}\n\n{text}" if system and system.strip() else text
    return query, system


def _grammar_list(grammar: str) -> List[dict]:
    """The grammars of an llguidance grammar (JSON, or bare Lark text)."""
    if grammar.lstrip().startswith("{"):
        return json.loads(grammar)["grammars"]
    return [{"lark_grammar": grammar}]


def _first_problem(message: str) -> str:
    """llguidance's message on one line, without the caret diagrams of the grammar it compiled."""
    lines = [line.strip() for line in message.splitlines()]
    keep = [line for line in lines if line and not re.match(r"^(\^|\d+ \|)", line)]
    return re.sub(r"^at \d+\(\d+\): ", "", " ".join(keep))


def _type_text(schema: dict, root: dict) -> str:
    schema = _resolve(schema, root)
    kinds = schema.get("type")
    kinds = " or ".join(kinds) if isinstance(kinds, list) else kinds or ""
    if "enum" in schema:
        kinds = "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        kinds = f"array of {_type_text(schema['items'], root)}s"
    return kinds


def _fields(schema: dict, root: dict, depth: int) -> List[str]:
    """One line per property (nested objects and arrays of objects indented under theirs)."""
    lines = []
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        prop = _resolve(prop, root) if isinstance(prop, dict) else {}
        about = prop.get("description", "")
        optional = "" if name in required else ", optional"
        lines.append(f"{'  ' * depth}- {name} ({_type_text(prop, root)}{optional})" + (f": {about}" if about else ""))
        inner = prop.get("items") if prop.get("type") == "array" else prop
        inner = _resolve(inner, root) if isinstance(inner, dict) else {}
        if isinstance(inner.get("properties"), dict):
            lines += _fields(inner, root, depth + 1)
    return lines


def _resolve(schema: dict, root: dict) -> dict:
    """A local ``$ref`` (``#/$defs/...``) followed; anything else as it is."""
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return schema
    node: Any = root
    for part in ref[2:].split("/"):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else schema


# -- llguidance's view of the vocabulary ----------------------------------------------------------------


class _Vocabulary:
    """What ``llguidance.LLTokenizer`` reads from a tokenizer wrapper: each id's bytes, the special ids, and an
    encoder (llguidance tokenizes forced text with it, to feed forced tokens as the model's tokenizer would)."""

    is_tokenizer_wrapper = True

    def __init__(self, tokens: List[bytes], special: List[int], tokenizer):
        self.tokens, self.special_token_ids = tokens, special
        self.eos_token_id, self.bos_token_id = min(tokenizer.eos_ids), tokenizer.bos_id
        self._encode = functools.lru_cache(maxsize=4096)(lambda text: tuple(tokenizer.encode(text)))
        self._lock = threading.Lock()

    def __call__(self, text) -> List[int]:
        text = text if isinstance(text, str) else bytes(text).decode("utf-8", "replace")
        with self._lock:
            return list(self._encode(text))


_vocabularies: Dict[tuple, Any] = {}
_building = threading.Lock()


def vocabulary(tokenizer, n_vocab: int):
    """llguidance's tokenizer object for ``tokenizer`` over ``n_vocab`` logits, built once per process."""
    key = (tokenizer.key, n_vocab)
    with _building:
        if key not in _vocabularies:
            _vocabularies[key] = _build_vocabulary(tokenizer, n_vocab)
        return _vocabularies[key]


def _build_vocabulary(tokenizer, n_vocab: int):
    llg = _library()
    eos = sorted(tokenizer.eos_ids)
    path = tokenizers_dir() / f"{tokenizer.key}.llguidance-{llg.__version__}-{n_vocab}.npz"
    table = _load_table(path)
    if table is None:
        # the library's own reading of tokenizer.json (token bytes, specials, padding past the tokenizer)
        full = llg.LLTokenizer(tokenizer.json_path.read_text(encoding="utf-8"), n_vocab=n_vocab, eos_token=eos)
        table = ([full.decode_bytes([i]) for i in range(n_vocab)],
                 [i for i in range(n_vocab) if full.is_special_token(i)])
        _save_table(path, table)
    tokens, special = table
    # EOS and BOS are never text, even where tokenizer.json lists them as plain tokens (an answer would end
    # on an EOS its grammar took for the letters of "<eos>")
    special = sorted(set(special) | set(eos) | ({tokenizer.bos_id} if tokenizer.bos_id is not None else set()))
    return llg.LLTokenizer(_Vocabulary(tokens, special, tokenizer), eos_token=eos)


def _load_table(path: Path) -> Optional[Tuple[List[bytes], List[int]]]:
    import numpy as np  # (not at import: the command line loads this module for its options)

    try:
        with np.load(path) as z:  # a zip whose members carry CRC-32s, checked as they are read
            blob, ends, special = z["blob"].tobytes(), z["ends"].tolist(), z["special"].tolist()
    except (OSError, ValueError, KeyError):
        return None
    starts = [0] + ends[:-1]
    return [blob[s:e] for s, e in zip(starts, ends)], special


def _save_table(path: Path, table: Tuple[List[bytes], List[int]]) -> None:
    """Keep the table in the store; a store that cannot be written only costs time."""
    import numpy as np

    tokens, special = table
    try:
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, blob=np.frombuffer(b"".join(tokens), np.uint8),
                         ends=np.cumsum([len(t) for t in tokens], dtype=np.int64), special=np.array(special, np.int64))
    except UrialError:
        pass


# -- one answer's matcher -------------------------------------------------------------------------------


class Guide:
    """One answer's matcher state: the tokens allowed next, the tokens forced next, whether it is complete.

    ``seconds`` adds up the host time spent on this answer's constraint (consuming tokens, masks, forced
    tokens); ``error`` is set if the matcher fails (a token it rejects, a grammar too complex to go on).
    """

    def __init__(self, constraint: Constraint, vocab, framed: bool):
        started = time.perf_counter()
        self.constraint = constraint
        self.matcher = _library().LLMatcher(vocab, constraint.grammar_for(framed), log_level=0)
        self.words = (vocab.vocab_size + 31) // 32
        self.error: Optional[str] = None
        self._note_error()
        self.seconds = time.perf_counter() - started

    def consume(self, token: int) -> None:
        started = time.perf_counter()
        if not self.matcher.consume_token(token):
            self._note_error()
        self.seconds += time.perf_counter() - started

    def forced(self) -> List[int]:
        """The tokens the grammar forces from here on, for as long as it does (consumed already): they need no
        draw. llguidance's forced tokens are the very tokens its masks would allow one at a time."""
        started = time.perf_counter()
        tokens: List[int] = []
        while self.error is None and not self.matcher.is_stopped():
            more = self.matcher.compute_ff_tokens()
            if not more:
                break
            if not self.matcher.consume_tokens(more):
                self._note_error()
            tokens += more
        self.seconds += time.perf_counter() - started
        return tokens

    def completion(self) -> List[int]:
        """The forced tokens if they complete the output (consumed), else none (nothing consumed): token-by-token
        decoding ends an answer where fast-forward does, once all that is left is forced (the closing fence)."""
        tokens = self.forced()
        if tokens and not self.complete and self.error is None:
            self.matcher.rollback(len(tokens))
            return []
        return tokens

    @property
    def complete(self) -> bool:
        """The output is all the grammar allows: nothing can follow (or EOS was consumed)."""
        return self.error is None and self.matcher.is_stopped()

    def _note_error(self) -> None:
        if self.error is None and self.matcher.is_error():
            self.error = f"the {self.constraint.kind} constraint failed: " \
                         f"{_first_problem(self.matcher.get_error().split('<state>')[0])}"


_executor = None


def fill_masks(guides: Sequence[Guide], out) -> None:
    """Each guide's mask of allowed tokens into a row of ``out`` (numpy int32, one bit per token), on llguidance's
    thread pool when there are several (it releases the GIL while the forward pass runs)."""
    global _executor
    llg = _library()
    started = time.perf_counter()
    if len(guides) == 1:
        llg.numpy.fill_next_token_bitmask(guides[0].matcher, out, 0)
    else:
        if _executor is None:
            _executor = llg.LLExecutor()
        llg.numpy.fill_next_token_bitmask_par(_executor, [(g.matcher, j) for j, g in enumerate(guides)], out)
    share = (time.perf_counter() - started) / len(guides)
    for g in guides:
        g.seconds += share
