"""tests/run_sharded.py: the sharded runner used for the GPU suite on the device."""

import os
import subprocess
import sys
import textwrap

import run_sharded

HERE = os.path.dirname(os.path.abspath(__file__))


def test_deal_round_robin():
    assert run_sharded.deal(list("abcde"), 2) == [["a", "c", "e"], ["b", "d"]]
    assert run_sharded.deal(list("ab"), 4) == [["a"], ["b"]]


def test_runs_shards_and_reports_failures(tmp_path):
    (tmp_path / "test_tiny.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("i", range(5))
        def test_ok(i):
            assert i >= 0

        def test_bad():
            assert 1 == 2
    """))
    res = subprocess.run([sys.executable, os.path.join(HERE, "run_sharded.py"), "--shards", "3", "--",
                          str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "6 tests in 3 processes" in res.stdout
    assert "FAILED " in res.stdout and "test_bad" in res.stdout
    assert res.stdout.count("rc=0") == 2 and res.stdout.count("rc=1") == 1
    res = subprocess.run([sys.executable, os.path.join(HERE, "run_sharded.py"), "--", "-k", "test_ok",
                          str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "5 tests in 4 processes" in res.stdout and "FAILED" not in res.stdout
    assert res.stdout.count(" passed in ") == 4


def test_sigterm_stops_the_shards(tmp_path):
    """``timeout`` sends SIGTERM to the runner only: its shards must stop with it (a
    shard left running kept the GPU and the CPUs busy under the timings that followed)."""
    import signal
    import time

    (tmp_path / "test_slow.py").write_text(textwrap.dedent("""
        import os, time

        def test_slow_a():
            open(os.path.join(os.path.dirname(__file__), f"pid{os.getpid()}"), "w").close()
            time.sleep(120)

        def test_slow_b():
            open(os.path.join(os.path.dirname(__file__), f"pid{os.getpid()}"), "w").close()
            time.sleep(120)
    """))
    runner = subprocess.Popen([sys.executable, os.path.join(HERE, "run_sharded.py"), "--shards", "2", "--",
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=tmp_path)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("pid*"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    pids = [int(p.name[3:]) for p in tmp_path.glob("pid*")]
    assert len(pids) == 2, "the shards did not start"
    runner.send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode == 128 + signal.SIGTERM, out
    assert "2 shards stopped" in out
    for pid in pids:
        alive = True
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
                break
            time.sleep(0.1)
        assert not alive, f"shard {pid} still running"


def test_options_reach_every_shard_and_logs_are_kept(tmp_path):
    """Options after ``--`` reach every shard (-rs: skip reasons; --durations=N), and
    ``--log-dir`` keeps each shard's whole log (the device's GPU suite reads them)."""
    (tmp_path / "test_skips.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_skipped(i):
            pytest.skip(f"reason number {i}")
    """))
    logs = tmp_path / "logs"
    res = subprocess.run([sys.executable, os.path.join(HERE, "run_sharded.py"), "--shards", "2",
                          "--log-dir", str(logs), "--", "-rs", "--durations=3", str(tmp_path / "test_skips.py")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    texts = [(logs / f"shard{n}.log").read_text() for n in range(2)]
    joined = "".join(texts)
    assert all(f"reason number {i}" in joined for i in range(4)), joined
    assert all("slowest" in t for t in texts), texts  # --durations' report, in each shard
