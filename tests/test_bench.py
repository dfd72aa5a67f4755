"""The benchmark suite runs end to end (on a tiny model) and writes consistent results."""

import json
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_gguf
from urial_edge.bench.suite import ROW_LLAMA_CPP, run_suite

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from suite_report import render  # noqa: E402  (the report is drawn by code under benchmarks/)


@pytest.mark.slow
def test_suite_writes_every_row_and_consistent_ratios(home, tmp_path):
    out = tmp_path / "results"
    gguf = make_tiny_gguf(tmp_path / "tiny.gguf")  # imported for MLX; llama.cpp reads the file itself
    result = run_suite(str(gguf), "urial-k0", repeats=1, out=out, decode_tokens=8)

    saved = json.loads((out / "suite.json").read_text())
    assert saved["ratios"] == pytest.approx(result["ratios"])
    cold = saved["cold"]
    assert len(cold) == 6 and ROW_LLAMA_CPP in cold
    for name, row in cold.items():
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 0, name
    cached = cold["urial-edge ask, cached (cold process)"]["wall_s"]
    floor = cold["floor: weights + prefix cache + query + 1 step"]["wall_s"]
    assert saved["ratios"]["cached ask / floor"] == pytest.approx(cached / floor)
    peer = cold[ROW_LLAMA_CPP]["wall_s"]
    assert saved["ratios"]["cached ask / llama.cpp with state file"] == pytest.approx(cached / peer)
    assert saved["decode"]["llama.cpp decode tok/s"] > 0 and "llama-cpp-python" in saved["machine"]["llama.cpp"]
    assert all(v > 0 for v in saved["warm"].values())
    batch = saved["batching"]["throughput"][0]
    assert batch["queries"] == 8 and batch["vs_single"]["identical"] == 8  # batched answers equal single ones
    assert saved["ratios"]["batch of 8 / sequential"] == pytest.approx(batch["batched / sequential"])
    assert [r["clients"] for r in saved["batching"]["server"]["concurrency"]] == [1, 8]
    render(saved, out)
    table = (out / "suite.md").read_text()
    assert all(name in table for name in cold)
    assert "Machine: platform" in table and (out / "suite.png").stat().st_size > 0
