"""Smoke test of the ``load`` bench suite: the run statistics it reports and its plot (Agg backend)."""

import math

import pytest

from bench.load import plot, run_load


def test_load_suite_rows_and_plot(tmp_path):
    rows, facts = run_load([{"model": "tiny", "E": 8, "k": 2}], "cpu", quick=True, H=16, I=8, T=16)
    assert [r["backend"] for r in rows] == ["topk", "hierarchical"]
    for r in rows:
        assert sum(r["tokens_per_expert"]) == 16 * 4 * 2 and len(r["tokens_per_expert"]) == 8
        assert 0 < r["load_entropy"] <= math.log(8) + 1e-6 and r["imbalance"] >= 1.0 and r["median_ms"] > 0
    pytest.importorskip("matplotlib")
    path = tmp_path / "load.png"
    assert plot(rows, path) == f"wrote {path}" and path.stat().st_size > 1000
