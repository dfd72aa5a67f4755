"""The command line, through click's CliRunner and real subprocesses (tiny models)."""

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import TINY_PROMPT
from urial_edge.cli.main import cli



@pytest.fixture
def args(home, tiny_llama, prompt_file):
    return ["--model", str(tiny_llama), "--prompt", prompt_file, "--max-tokens", "8"]


def run(*argv, input=None):
    return CliRunner().invoke(cli, list(argv), input=input, catch_exceptions=False)


def assert_one_line_error(result, code=1, match=""):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0]
    assert "Traceback" not in result.output


def test_ask_json_reports_ttft_and_cache_hit(args):
    first = run("ask", *args, "--json", "What is a river?")
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert set(data) >= {"text", "stats"} and data["stats"]["cache_hit"] is False
    assert data["stats"]["ttft"] > 0
    second = json.loads(run("ask", *args, "--json", "What is a river?").stdout)
    assert second["stats"]["cache_hit"] is True and second["text"] == data["text"]
    full = json.loads(run("ask", *args, "--json", "--no-cache", "What is a river?").stdout)
    assert full["text"] == data["text"] and full["stats"]["prefill_tokens"] > data["stats"]["prefill_tokens"]


def test_ask_reads_stdin_and_streams_only_the_answer(args):
    by_arg = run("ask", *args, "Name a colour.")
    by_stdin = run("ask", *args, "-", input="Name a colour.")
    assert by_arg.exit_code == by_stdin.exit_code == 0
    assert by_arg.stdout == by_stdin.stdout
    verbose = run("ask", *args, "-v", "Name a colour.")
    assert verbose.stdout == by_arg.stdout and "ttft" in verbose.stderr


@pytest.mark.parametrize("argv,stdin,match,code", [
    (["ask", "   "], None, "the query is empty", 1),
    (["ask", "-"], b"\xff\xfe bad", "not valid UTF-8", 1),
    (["ask", "--temperature", "9", "x"], None, "", 2),
    (["ask", "--model", "no-such-model", "x"], None, "unknown model", 1),
    (["ask", "--prompt", "no-such-prompt", "x"], None, "unknown prompt", 1),
    (["prompts", "show", "missing.toml"], None, "no such prompt file", 1),
    (["models", "remove", "nothing"], None, "no model named", 1),
    (["models", "import", "/nonexistent.gguf"], None, "no such file", 1),
    (["cache", "clear", "--older-than", "soon"], None, "invalid duration", 2),
])
def test_bad_input_gives_one_line_errors(home, argv, stdin, match, code):
    result = CliRunner().invoke(cli, argv, input=stdin)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    if code == 1:
        assert_one_line_error(result, code, match)


def test_query_longer_than_context_names_both_numbers(args):
    result = run("ask", *args, "word " * 3000)
    assert_one_line_error(result, 1, "tokens of context are left")


def test_batch_is_resumable_and_reports_bad_lines(args, tmp_path):
    infile, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    infile.write_text('{"id": "a", "query": "Hi?"}\nnot json\n{"id": "b", "query": ""}\n'
                      '{"id": 7, "query": "Bye?"}\n{"id": "a", "query": "dup"}\n')
    result = run("batch", str(infile), "-o", str(out), *args)
    assert result.exit_code == 3
    assert "in.jsonl:2:" in result.stderr and "in.jsonl:3:" in result.stderr and "in.jsonl:5:" in result.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["a", 7] and all("text" in x and "stats" in x for x in lines)
    # an interrupted run left half a line: it is dropped and redone; finished ids are skipped
    out.write_text(out.read_text().splitlines(keepends=True)[0] + '{"id": 7, "te')
    again = run("batch", str(infile), "-o", str(out), *args)
    assert "1 answered, 1 already done" in again.stderr
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", 7]


def test_chat_repl_commands_and_session(args):
    script = "Hello?\n/save\nWhat next?\n/reset\n/unknown\nAgain?\n/exit\n"
    result = run("chat", *args, "--session", "s1", input=script)
    assert result.exit_code == 0, result.output
    assert "saved to" in result.stderr and "conversation cleared" in result.stderr and "unknown command" in result.stderr
    assert len(result.stdout.strip().splitlines()) >= 1
    resumed = run("chat", *args, "--session", "s1", input="/exit\n")
    assert "resumed session 's1': 1 turns" in resumed.stderr


def test_cache_and_models_commands(args, home):
    assert run("cache", "build", *args[:4]).exit_code == 0
    listing = run("cache", "list")
    assert "tiny" in listing.stdout
    assert run("cache", "verify").exit_code == 0
    cache_file = next((home / "cache").glob("*.safetensors"))
    cache_file.write_bytes(cache_file.read_bytes()[:1000])
    bad = run("cache", "verify")
    assert bad.exit_code == 1 and "BAD" in bad.stdout
    assert run("cache", "path").stdout.strip().splitlines()[-1] == str(home / "cache")
    assert run("cache", "clear").exit_code == 0 and not list((home / "cache").glob("*.safetensors"))
    info = run("models", "info", args[1], "--path")
    assert info.stdout.strip().splitlines()[-1] == args[1]
    assert "gemma-3-270m" in run("models", "list").stdout


def test_prompts_commands(home):
    assert "urial-k3" in run("prompts", "list").stdout
    rendered = run("prompts", "show", "urial-k3", "--rendered").stdout
    assert rendered.startswith("# Instruction\n\n") and rendered.endswith("```\n\n")


def test_subprocess_ask_and_version(args, home):
    env = {**os.environ, "URIAL_EDGE_HOME": str(home)}
    exe = [sys.executable, "-m", "urial_edge.cli"]
    version = subprocess.run([*exe, "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and "urial-edge" in version.stdout
    out = subprocess.run([*exe, "ask", *args, "--json", "Hi?"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stats"]["ttft"] > 0
    bad = subprocess.run([*exe, "ask", *args, ""], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: the query is empty"


def test_doctor_describes_the_setup(home):
    result = run("doctor")
    assert result.exit_code == 0, result.output
    for key in ("platform", "mlx device", "blas", "mlx-lm", "home", "cache", "default model"):
        assert key in result.stdout
    if sys.platform.startswith("linux"):
        assert "reference BLAS" not in result.stdout  # the default install brings an optimised BLAS


def test_optimised_blas_can_be_turned_off(home):
    code = "import urial_edge, mlx.core; from urial_edge.model.backend import blas_in_use; print(blas_in_use())"
    env = {**os.environ, "URIAL_EDGE_BLAS": "off"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0
    if sys.platform.startswith("linux"):
        assert "reference BLAS" in out.stdout


def test_validate_reports_each_problem_on_its_own_line(home, tiny_llama, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('system = "S"\n[[examples]]\nquery = "q"\nanswer = "a"\n'
                   '[[examples]]\nquery = "q"\nanswer = "```\\nx"\n')
    result = run("prompts", "validate", str(bad), "--model", str(tiny_llama))
    assert result.exit_code == 1
    problems = result.stdout.strip().splitlines()
    assert len(problems) == 2 and "repeats" in problems[0] and "fence" in problems[1]
    good = tmp_path / "good.toml"
    good.write_text(TINY_PROMPT)
    assert run("prompts", "validate", str(good), "--model", str(tiny_llama)).exit_code == 0


def test_prompt_longer_than_the_context(home, tiny_llama):
    # the byte-level tiny tokenizer makes urial-k8 far longer than the tiny model's 2048 tokens
    result = run("ask", "--model", str(tiny_llama), "--prompt", "urial-k8", "hi")
    assert_one_line_error(result, 1, "longer than the model's context of 2048")
    result = run("prompts", "validate", "urial-k8", "--model", str(tiny_llama))
    assert result.exit_code == 1 and "longer than the model's context" in result.stdout


def test_subprocess_batch(args, home, tmp_path):
    infile, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    infile.write_text('{"id": 1, "query": "Hi?"}\n{"id": 2, "query": "Bye?"}\n')
    env = {**os.environ, "URIAL_EDGE_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "urial_edge.cli", "batch", str(infile), "-o", str(out), *args],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and "2 answered" in proc.stderr
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [1, 2]


# -- structured output -----------------------------------------------------------------------------

SMALL = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "w": {"enum": ["up", "down"]}},
         "required": ["n", "w"], "additionalProperties": False}


def test_ask_takes_every_kind_of_constraint(args, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SMALL))
    for given in (str(schema), json.dumps(SMALL)):
        result = run("ask", *args, "--max-tokens", "60", "--json", "--schema", given, "Numbers?")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["finish_reason"] == "stop" and data["value"] == json.loads(data["text"])
        assert set(data["value"]) == {"n", "w"} and data["value"]["w"] in ("up", "down")
    assert "value" not in json.loads(run("ask", *args, "--json", "Numbers?").stdout)
    assert re.fullmatch(r"[a-c]{3}\n", run("ask", *args, "--regex", "[a-c]{3}", "x").stdout)
    assert run("ask", *args, "--choice", "yes", "--choice", "no", "x").stdout in ("yes\n", "no\n")
    lark, gbnf, detected = tmp_path / "g.lark", tmp_path / "g.gbnf", tmp_path / "g.txt"
    lark.write_text('start: "v" /[0-9]/\n')
    gbnf.write_text('root ::= "w" [0-9]\n')
    detected.write_text('root ::= "w" [0-9]\n')
    assert re.fullmatch(r"v[0-9]\n", run("ask", *args, "--grammar", str(lark), "x").stdout)
    assert re.fullmatch(r"w[0-9]\n", run("ask", *args, "--grammar", str(gbnf), "x").stdout)
    assert run("ask", *args, "--grammar", str(detected), "x").stdout == run("ask", *args, "--grammar", str(gbnf),
                                                                             "x").stdout


@pytest.mark.parametrize("argv,match", [
    (["--schema", '{"type": "strin"}'], "Invalid type: strin"),
    (["--schema", "missing.json"], "cannot read schema file"),
    (["--regex", "a("], "invalid regex"),
    (["--choice", ""], "a choice must not be empty"),
    (["--grammar", "missing.lark"], "cannot read grammar file"),
    (["--schema", "{}", "--regex", "a"], "give one constraint, not --schema and --regex"),
])
def test_bad_constraints_exit_2_naming_the_option(args, argv, match):
    result = CliRunner().invoke(cli, ["ask", *args, *argv, "x"])
    assert result.exit_code == 2 and match in result.stderr and "Traceback" not in result.output
    flag = argv[-2] if len(argv) > 2 else argv[0]
    assert f"Invalid value for {flag}:" in result.stderr


def test_batch_lines_may_carry_their_own_schema(args, tmp_path):
    infile, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    infile.write_text(json.dumps({"id": 1, "query": "A?", "schema": SMALL}) + "\n"
                      + json.dumps({"id": 2, "query": "B?"}) + "\n"
                      + json.dumps({"id": 3, "query": "C?", "schema": {"type": "strin"}}) + "\n")
    result = run("batch", str(infile), "-o", str(out), *args, "--max-tokens", "60", "--choice", "x", "--choice", "y")
    assert result.exit_code == 3 and "in.jsonl:3: invalid schema: Invalid type: strin" in result.stderr
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {1, 2}
    assert set(rows[1]["value"]) == {"n", "w"} and rows[2]["value"] in ("x", "y")


def test_chat_follows_its_constraint_every_turn(args):
    result = run("chat", *args, "--choice", "left", "--choice", "right", input="Which way?\nAnd now?\n/exit\n")
    assert result.exit_code == 0, result.output
    assert all(line in ("left", "right") for line in result.stdout.splitlines())
    assert len(result.stdout.splitlines()) == 2
