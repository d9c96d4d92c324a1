"""examples/train_data_parallel.py under `mlx.launch -n 2` (ring backend, 2 local CPU processes).

Both ranks must end with bit-identical parameters that training changed, the
loss must fall, and the 2-process run must match a single process training on
the whole batch (which it only does if the gradients really are averaged).

What mlx.launch (MLX 0.32.4) does here, and why the test does what it does:
- it always exits 0, even when a rank fails, so success is judged from the
  ranks' output files and the launcher's "[WARN] Node with rank N ..." lines;
- without ``--python`` it executes the script file itself, so it gets
  ``--python sys.executable`` (the ranks then run this interpreter);
- it parses options after the script too (``-n``, ``--env``, abbreviations),
  so the script goes after ``--``;
- rank r of the ring listens on 127.0.0.1:(starting port + r): the test picks
  two free ports below the ephemeral range and retries if one was taken;
- it writes the hostfile and a pid file with mktemp and never removes them,
  hence TMPDIR points into the test's own temporary directory.
"""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import sysconfig
from importlib import metadata

import pytest

import mlx.core as mx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join("examples", "train_data_parallel.py")
ARGS = ["--steps", "12", "--batch", "16", "--seq", "12", "--hidden", "16"]
TIMEOUT = 120  # s per run; a run takes a few seconds, this only stops a hung ring
BIND_FAILED = ("Couldn't bind socket", "Address already in use")
LOSS_LINE = re.compile(r"^loss: ([0-9.]+) -> ([0-9.]+)$", re.M)


def launcher():
    """argv that runs mlx.launch with this interpreter, or None."""
    script = os.path.join(sysconfig.get_path("scripts"), "mlx.launch")
    if os.path.isfile(script):  # the console script pip installed next to this python
        return [sys.executable, script]
    try:
        (ep,) = metadata.entry_points(group="console_scripts", name="mlx.launch")
    except ValueError:
        return None
    code = f"import sys; from {ep.module} import {ep.attr} as m; sys.argv[0] = 'mlx.launch'; sys.exit(m())"
    return [sys.executable, "-c", code]


def can_listen_on_localhost():
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
        return True
    except OSError:
        return False


def free_ports(n):
    """A starting port p with p .. p+n-1 all free, below the ephemeral range (so no
    outgoing connection takes one in the meantime) when that range is readable."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        p = random.randrange(20000, max(20001, low - n))
        socks = []
        try:
            for port in range(p, p + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free localhost ports found")


def run_job(argv, tmp, timeout=TIMEOUT):
    env = dict(os.environ, TMPDIR=str(tmp))
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MLX_RNN_IMPL", None)
    for var in ("MLX_HOSTFILE", "MLX_RANK", "MLX_WORLD_SIZE"):  # not from an outer job
        env.pop(var, None)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks: the group it leads
        out, err = proc.communicate()
        pytest.fail(f"{argv} ran past {timeout} s\n{out}\n{err}")
    return proc.returncode, out, err


def load(path):
    return mx.load(str(path), return_metadata=True)  # (arrays, metadata)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    prefix = launcher()
    if prefix is None:
        pytest.skip("mlx.launch is not installed with this mlx")
    if not mx.distributed.is_available("ring"):
        pytest.skip("this mlx build has no ring backend")
    if not can_listen_on_localhost():
        pytest.skip("cannot listen on 127.0.0.1 here")
    for attempt in range(3):
        tmp = tmp_path_factory.mktemp(f"dp{attempt}")
        out_dir = tmp / "out"
        argv = [*prefix, "-n", "2", "--starting-port", str(free_ports(2)), "--python", sys.executable,
                "--", EXAMPLE, *ARGS, "--out", str(out_dir)]
        rc, out, err = run_job(argv, tmp)
        if not any(s in err for s in BIND_FAILED):
            break  # otherwise a port was taken between the check and the bind: new ports
    log = f"$ {' '.join(argv)}\nrc={rc}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert rc == 0, log
    assert "Node with rank" not in err, log  # mlx.launch's warning when a rank failed
    for r in (0, 1):
        assert (out_dir / f"rank{r}.safetensors").is_file(), log
    return out_dir, out, log


def test_ranks_end_identical_and_trained(two_ranks):
    out_dir, out, log = two_ranks
    assert "2 process(es)" in out, log
    (p0, m0), (p1, m1) = (load(out_dir / f"rank{r}.safetensors") for r in (0, 1))
    init, _ = load(out_dir / "init.safetensors")
    assert (m0["rank"], m0["size"], m1["rank"], m1["size"]) == ("0", "2", "1", "2"), (m0, m1)
    # a stacked bidirectional LSTM with torch's parameter names
    assert {"lstm.weight_ih_l1_reverse", "lstm.weight_hh_l0_reverse", "lstm.bias_ih_l1"} <= set(p0), sorted(p0)
    assert set(p0) == set(p1) == set(init)
    for k in sorted(p0):
        assert p0[k].shape == init[k].shape, k
        assert mx.array_equal(p0[k], p1[k]).item(), f"{k} differs between the ranks"
    changed = [k for k in p0 if not mx.array_equal(p0[k], init[k]).item()]
    assert len(changed) == len(p0), f"training left these unchanged: {sorted(set(p0) - set(changed))}"
    m = LOSS_LINE.search(out)
    assert m, log
    assert float(m.group(2)) < 0.8 * float(m.group(1)), log
    assert re.search(r"^tokens/s: [0-9]+", out, re.M), log
    assert len(re.findall(r"^step +\d+ +loss ", out, re.M)) == 12, log  # rank 0 only prints


def test_matches_one_process_on_the_whole_batch(two_ranks, tmp_path):
    """Averaged shard gradients == the whole batch's gradient, so one process
    (no launcher, size 1) trains to the same parameters up to rounding."""
    out_dir, _, _ = two_ranks
    rc, out, err = run_job([sys.executable, EXAMPLE, *ARGS, "--out", str(tmp_path)], tmp_path)
    assert rc == 0, f"{out}\n{err}"
    assert "1 process(es)" in out, out
    single, meta = load(tmp_path / "rank0.safetensors")
    assert meta["size"] == "1"
    dist, _ = load(out_dir / "rank0.safetensors")
    for k in sorted(dist):
        diff = mx.abs(dist[k] - single[k]).max().item()
        assert diff < 1e-3, f"{k}: 2 processes vs 1 differ by {diff}"
