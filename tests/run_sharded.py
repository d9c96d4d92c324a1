"""Run a pytest selection in N processes at once (the GPU suite on the device).

    python3 tests/run_sharded.py --shards 4 -- -m gpu tests

On a fresh CUDA machine the GPU suite spends most of its time compiling
kernels (NVRTC, one CPU core per process), so it runs N times faster in N
processes; the GPU itself is shared between them (time-sliced). Test ids are
dealt round-robin in collection order, so the parametrized variants of one
test spread over the shards. A test that leaves the CUDA context broken only
takes its own shard's later tests with it. Prints each shard's summary, then
one line per failed test; exits 1 if any shard failed, 5 if nothing was
collected. SIGTERM / SIGINT (e.g. ``timeout``) stop the shards too, exit 143 /
130: a shard left running would keep the GPU busy under what is timed next.
"""

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time


SUMMARY = re.compile(r"\d+ (passed|failed|skipped|errors?|deselected)\b.* in [\d.]+s")


def collect(pytest_args):
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *pytest_args], capture_output=True, text=True)
    ids = [line.strip() for line in res.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    return ids, res


def deal(ids, shards):
    return [ids[i::shards] for i in range(shards) if ids[i::shards]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--log-dir", default=None,
                    help="keep each shard's whole pytest log there (shard<n>.log); else a temporary directory")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER,
                    help="after --: what to select, and pytest options for every shard (-x, -rs, --durations=N: "
                         "an option's value joined to it by '=', except -m / -k)")
    args = ap.parse_args(argv)
    pytest_args = [a for a in args.pytest_args if a != "--"] or ["tests"]
    ids, res = collect(pytest_args)
    if not ids:
        print(res.stdout[-2000:], res.stderr[-2000:])
        print("run_sharded: nothing collected")
        return 5
    # -m / -k stay (they also filter at run time) and so do the other options (-x, -rs,
    # --durations=N); paths are replaced by the ids. -r's characters join the runner's own.
    keep, report = [], "fE"
    it = iter(pytest_args)
    for a in it:
        if a in ("-m", "-k"):
            keep += [a, next(it, "")]
        elif a.startswith("-r") and len(a) > 2:
            report += "".join(c for c in a[2:] if c not in report)
        elif a.startswith("-"):
            keep.append(a)
    groups = deal(ids, max(1, args.shards))
    t0 = time.time()
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    with contextlib.nullcontext(args.log_dir) if args.log_dir else tempfile.TemporaryDirectory() as d:
        procs = []

        def stop(signum, frame):
            for proc, _, _ in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc, _, _ in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            print(f"run_sharded: stopped by signal {signum}; {len(procs)} shards stopped", flush=True)
            sys.exit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        for n, group in enumerate(groups):
            log = open(os.path.join(d, f"shard{n}.log"), "w+")
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-r" + report, *keep, *group]
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, len(group)))
        print(f"run_sharded: {len(ids)} tests in {len(groups)} processes", flush=True)
        worst, failed = 0, []
        for n, (proc, log, count) in enumerate(procs):
            rc = proc.wait()
            log.seek(0)
            lines = log.read().splitlines()
            summary = next((ln for ln in reversed(lines) if SUMMARY.search(ln)), "?")
            failed += [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
            print(f"shard {n} ({count} tests) rc={rc}: {summary.strip('= ')}", flush=True)
            if rc not in (0, 5):
                worst = 1
                print("\n".join(lines[-40:]))
        for ln in failed:
            print(ln)
        print(f"run_sharded: done in {time.time() - t0:.0f} s, {'FAILED' if worst else 'ok'}")
    return worst


if __name__ == "__main__":
    sys.exit(main())
