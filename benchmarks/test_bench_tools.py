"""The benchmark harness itself (runs in a plain ``pytest``; tiny shapes)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recurrent_bench  # noqa: E402


def test_measure_interleaved_alternates_and_counts():
    calls = []
    runs = {"legacy": lambda: calls.append("legacy"), "fast": lambda: calls.append("fast")}
    times = recurrent_bench.measure_interleaved(runs, budget=0.0, min_repeats=4)
    assert [len(times["legacy"]), len(times["fast"])] == [4, 4]
    assert all(t >= 0 for ts in times.values() for t in ts)
    rounds = calls[2:]  # after one untimed call of each
    assert rounds == ["legacy", "fast", "fast", "legacy", "legacy", "fast", "fast", "legacy"]


def test_compare_interleaves_short_configs(tmp_path):
    out = tmp_path / "b.json"
    argv = ["--compare", "--layers", "GRU", "--shapes", "2x3x8", "--modes", "fwd", "--budget", "0.02",
            "--json", str(out)]
    assert recurrent_bench.main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["impl"] for r in rows} == {"legacy", "fast"}
    assert all(r.get("interleaved") for r in rows)
    assert rows[0]["repeats"] == rows[1]["repeats"] >= 3
    assert recurrent_bench.main(argv + ["--interleave-below", "0"]) == 0
    assert not any(r.get("interleaved") for r in json.loads(out.read_text())["results"])
