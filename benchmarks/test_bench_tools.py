"""The benchmark harness itself (runs in a plain ``pytest``; tiny shapes)."""

import json
import os
import sys

import pytest

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


def test_measure_times_a_slow_config_by_a_call_after_the_first():
    """A first call over ``slow`` (say, compiling a kernel the short twin did not
    need) is not the sample: a second call is made; only when that is slow too
    does it stand alone, else the config is timed as usual."""
    import time

    def run_with(delays):
        it = iter(delays)
        return lambda: time.sleep(next(it, 0.0)) or 0

    stats, _ = recurrent_bench.measure(run_with([0.06]), budget=0.0, min_repeats=3, slow=0.05)
    assert not stats["single_call"] and stats["repeats"] >= 3 and stats["median_ms"] < 50
    assert stats["first_ms"] >= 60
    stats, _ = recurrent_bench.measure(run_with([0.06, 0.07, 0.0]), budget=0.0, min_repeats=3, slow=0.05)
    assert stats["single_call"] and stats["repeats"] == 1 and 70 <= stats["median_ms"] < 100


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


def test_flashrnn_scripts_share_one_grid(tmp_path):
    """flashrnn_bench.py (ours) and flashrnn_torch.py (FlashRNN) walk the same grid;
    the FlashRNN builds are one per kernel (not per T or mode), split by --part."""
    import flashrnn_bench
    import flashrnn_torch

    grid = ["--functions", "lstm,slstm", "--heads", "1,2", "--dims", "4", "--batches", "2", "--lengths", "3,5",
            "--dtype", "float32", "--modes", "fwd,fwdbwd"]
    timed = flashrnn_torch.configs(flashrnn_torch.parse_args(grid + ["--backends", "cuda"]))
    assert len(timed) == 2 * 2 * 2 * 2
    builds = [flashrnn_torch.configs(flashrnn_torch.parse_args(grid + ["--backends", "cuda", "--build-only",
                                                                       "--part", f"{i}/3"])) for i in (1, 2, 3)]
    assert sorted(c for part in builds for c in part) == sorted({c[:6] + (2, "fwdbwd") for c in timed})
    out = tmp_path / "ours.json"
    assert flashrnn_bench.main(grid + ["--budget", "0.01", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    ours = [("cuda", r["dtype"], r["function"], r["heads"], r["dim"], r["batch"], r["length"], r["mode"])
            for r in rows]
    assert ours == timed and all(r["median_ms"] > 0 for r in rows)
    both = flashrnn_torch.configs(flashrnn_torch.parse_args(grid + ["--backends", "cuda,triton_fused"]))
    assert [c[0] for c in both[:4]] == ["cuda", "triton_fused"] * 2  # backends in turns per config
    assert [c[1:] for c in both[::2]] == [c[1:] for c in timed]


def test_class_table_keeps_the_fastest_split(tmp_path):
    """kernel_classes_tune.write_table: per (cell, direction, dtype, B, H) the fastest
    candidate, with its K-split as a sixth entry only when it splits."""
    import kernel_classes_tune as kct

    base = dict(cell="lstm", direction="forward", dtype="float32", B=8, H=64, class_="resident")
    rows = [dict(base, ms=2.0, BB=2, RPT=1, KSP=1), dict(base, ms=1.0, BB=4, RPT=1, KSP=4),
            dict(base, H=32, ms=1.5, BB=1, RPT=1, KSP=1), dict(base, H=128, error="x")]
    for r in rows:
        r["class"] = r.pop("class_")
    meta = dict(host="test", mlx="0", limits=dict(num_sms=1), length=10, started="now")
    path = tmp_path / "table.py"
    kct.write_table(rows, meta, str(path))
    scope = {}
    exec(path.read_text(), scope)
    assert scope["SELECTION"] == {("lstm", "forward", "float32"): [(8, 32, "resident", 1, 1),
                                                                  (8, 64, "resident", 4, 1, 4)]}


def test_tuning_candidates_cover_column_splits_and_restore_the_env(monkeypatch):
    """persistent_tune's candidate splits include warp tasks with and without column
    splits (to time the planner's choice), and leave MLX_FASTRNN_PERSISTENT_COLSPLIT as
    they found it."""
    import mlx.core as mx
    import persistent_tune
    from mlx_fastrnn.kernels import persistent as P

    h100 = P.Limits(num_sms=132, smem_per_block=232448, smem_per_sm=233472)
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_COLSPLIT", "keep")
    plans = persistent_tune.candidate_plans("forward", "lstm", 256, 64, h100, mx.float32)
    assert {p.NCS for p in plans} >= {1, 8} and all(p.nblocks <= 132 for p in plans)
    assert os.environ["MLX_FASTRNN_PERSISTENT_COLSPLIT"] == "keep"
    assert "RB4/8" in persistent_tune.plan_text(next(p for p in plans if p.NCS == 8))


def test_env_ab_alternates_the_setting_and_restores_it(tmp_path, monkeypatch):
    import env_ab

    monkeypatch.setenv("FRNN_AB_PROBE", "outer")
    assert env_ab.with_env("FRNN_AB_PROBE", "", lambda: os.environ.get("FRNN_AB_PROBE")) is None
    assert env_ab.with_env("FRNN_AB_PROBE", "7", lambda: os.environ.get("FRNN_AB_PROBE")) == "7"
    assert os.environ["FRNN_AB_PROBE"] == "outer"
    cases = env_ab.parse_cases("GRU:2x3x8:float32", "lstm:2x4:2x8:bfloat16")
    assert [c[0] for c in cases] == ["GRU 2x3x8 float32", "flashrnn lstm B=2 T=4 N=2 D=8 bfloat16"]
    out = tmp_path / "ab.json"
    assert env_ab.main(["--env", "FRNN_AB_PROBE", "--values", ",1", "--layers", "GRU:2x3x8:float32",
                        "--flashrnn", "lstm:2x4:2x8:bfloat16", "--modes", "fwd", "--rounds", "2",
                        "--round-ms", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["case"], r["mode"], r["a"], r["b"]) for r in data["results"]] == [
        ("GRU 2x3x8 float32", "fwd", "", "1"), ("flashrnn lstm B=2 T=4 N=2 D=8 bfloat16", "fwd", "", "1")]
    assert all(r["a_ms"] > 0 and r["b_ms"] > 0 for r in data["results"])
    assert os.environ["FRNN_AB_PROBE"] == "outer"


@pytest.mark.parametrize("name", ["MLX_USE_CUDA_GRAPHS", "MLX_ENABLE_TF32"])
def test_env_ab_refuses_what_mlx_reads_once(name):
    """Switches MLX reads once per process cannot be A/B'd in one process (for the graphs
    switch the planner would pick cluster plans MLX then runs under graphs)."""
    import env_ab

    with pytest.raises(SystemExit):
        env_ab.main(["--env", name, "--values", ",0", "--layers", "GRU:2x3x8:float32"])


def test_report_flashrnn_ratios(tmp_path):
    """report.py --flashrnn: FlashRNN's fastest backend ÷ ours per configuration timed on
    both sides, by subset, and the configurations where ours is slower."""
    import report

    def cfg(**kw):
        return dict(dict(dtype="float32", function="lstm", heads=1, dim=64, batch=16, length=256,
                         mode="fwd"), **kw)

    ours = {"meta": {"tool": "flashrnn_bench"}, "results": [
        {**cfg(), "median_ms": 1.0}, {**cfg(heads=4), "median_ms": 4.0},
        {**cfg(dim=128), "median_ms": 1.0}, {**cfg(mode="fwdbwd"), "error": "x"}]}
    theirs = {"meta": {"tool": "flashrnn_torch"}, "results": [
        {**cfg(), "backend": "cuda", "median_ms": 3.0}, {**cfg(), "backend": "triton_fused", "median_ms": 2.0},
        {**cfg(heads=4), "backend": "cuda", "median_ms": 1.0}, {**cfg(mode="fwdbwd"), "backend": "cuda",
                                                                 "median_ms": 1.0}]}
    paths = []
    for name, data in (("o.json", ours), ("t.json", theirs)):
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_text(json.dumps(data))
    pairs = report.flashrnn_pairs(paths)
    assert [(p[0][2], p[1], p[2], p[3]) for p in pairs] == [(1, 1.0, 2.0, "triton_fused"), (4, 4.0, 1.0, "cuda")]
    text = report.render_flashrnn(pairs)
    assert "| all | 2 | 1 | 0.71× | 0.25× | 2.00× |" in text  # sqrt(2 * 0.25)
    assert "| where `triton_fused` is its fastest | 1 | 1 | 2.00× | 2.00× | 2.00× |" in text
    assert "- float32 lstm 4 64 16 256 fwd: 0.25× (4.000 / 1.000 ms, cuda)" in text
    out = tmp_path / "vs.md"
    assert report.main(["--flashrnn", *paths, "--out", str(out)]) == 0
    assert out.read_text() == text


def test_report_fails_when_no_result_file_exists(tmp_path, capsys):
    import report

    assert report.main([str(tmp_path / "nope.json")]) == 1
    assert "none of the result files exists" in capsys.readouterr().err
