"""The benchmark suite runs end to end (on a tiny model) and writes consistent results."""

import json

import pytest

from urial_edge.bench import run_suite


@pytest.mark.slow
def test_suite_writes_every_row_and_consistent_ratios(home, tiny_llama, tmp_path):
    out = tmp_path / "results"
    result = run_suite(str(tiny_llama), "urial-k0", repeats=1, out=out, decode_tokens=8)

    saved = json.loads((out / "suite.json").read_text())
    assert saved["ratios"] == pytest.approx(result["ratios"])
    cold = saved["cold"]
    assert len(cold) == 5
    for name, row in cold.items():
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 0, name
    cached = cold["urial-edge ask, cached (cold process)"]["wall_s"]
    floor = cold["floor: weights + prefix cache + query + 1 step"]["wall_s"]
    assert saved["ratios"]["cached ask / floor"] == pytest.approx(cached / floor)
    assert all(v > 0 for v in saved["warm"].values())
    table = (out / "suite.md").read_text()
    assert all(name in table for name in cold)
    assert "Machine: platform" in table
