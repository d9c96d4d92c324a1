"""Which whole-sequence kernel class (and resident split) is fastest, per shape (CUDA only).

    python benchmarks/kernel_classes_tune.py --json /tmp/classes.json --write-table
    python benchmarks/kernel_classes_tune.py --cells lstm --batches 1,8 --hiddens 64

For each cell, dtype, batch B, hidden H (sequence length ``--length``) and
direction, the kernel alone (no input projection, zero initial state) on:

* ``tiled``: the planner's plan of ``kernels/persistent.py``;
* ``resident`` candidates of ``kernels/resident.py``: rows per block x rows per thread, and
  the K-split (threads per unit: ``--k-splits``).

Each candidate is checked against the first one that ran (max abs difference)
and timed (median of ``--repeats`` calls, ms and us/step). ``--write-table``
writes ``mlx_fastrnn/kernels/class_table.py``: per (cell, direction, dtype)
the fastest choice at every measured (B, H) - what ``kernels/classes.py``
selects from.

Building a kernel (NVRTC) takes about a second, and there are hundreds: run one
process per cell and dtype in parallel with ``--lock FILE`` - each builds its
kernels, then times them only while holding the lock (the GPU timed by one
process at a time) - and merge their JSON afterwards:

    python benchmarks/kernel_classes_tune.py --merge /tmp/c_*.json --json all.json --write-table
"""

import argparse
import fcntl
import json
import os
import platform
import pprint
import sys
import time

import mlx.core as mx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

from mlx_fastrnn.kernels import persistent as P  # noqa: E402
from mlx_fastrnn.kernels import resident as R  # noqa: E402
from persistent_bench import make_problem, timeit  # noqa: E402

TABLE = os.path.join(ROOT, "mlx_fastrnn", "kernels", "class_table.py")
CANDIDATES = ((1, 1), (2, 1), (2, 2), (4, 1), (4, 4), (8, 2))  # (rows per block, rows per thread)


def resident_candidates(direction, cell, H, B, limits, dtype, k_splits=(1,)):
    out = {}
    for bb, rpt in CANDIDATES:
        if bb > B and bb != 1:
            continue
        for ksp in k_splits:
            # as it runs: W_h in registers where it fits (``R.with_registers``)
            p = R.with_registers(R.plan(direction, cell, H, B, limits, dtype, 1, bb, rpt, ksp=ksp), limits)
            if p is not None:
                out.setdefault((p.BB, p.RPT, p.RS, p.KSP), p)
    return list(out.values())


def diff(a, b):
    return max(mx.abs(x.astype(mx.float32) - y.astype(mx.float32)).max().item() for x, y in zip(a, b))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="gru,lstm,rnn_tanh,slstm")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--hiddens", default="32,64,128,200")
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--directions", default="forward,backward")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compile-only", action="store_true", help="build and run each kernel once, untimed")
    ap.add_argument("--k-splits", default="1,2,4",
                    help="threads per unit splitting the resident projection's K (comma-separated; 1: no split)")
    ap.add_argument("--lock", default=None, metavar="PATH",
                    help="time only while holding this file's lock (parallel tuning processes take turns)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--write-table", nargs="?", const=TABLE, default=None, metavar="PATH",
                    help=f"write the selection table (default path {os.path.relpath(TABLE, ROOT)})")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="measure nothing: merge these results (into --json, --write-table)")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json, args.write_table)
    if not P.cuda_available():
        raise SystemExit("kernel_classes_tune: needs MLX's CUDA backend")
    limits = P.device_limits()
    L = args.length
    meta = {"host": platform.node(), "mlx": mx.__version__, "limits": limits.__dict__, "length": L,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)}
    results = []

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)

    # Phase 1: build every candidate and run it once (NVRTC compiles: CPU-bound, so
    # several tuning processes do this part in parallel). Phase 2, under --lock:
    # time them, one process at a time on the GPU.
    jobs = []
    for cell in args.cells.split(","):
        if cell not in P.CELLS:
            raise SystemExit(f"unknown cell {cell!r}")
        n = P.CELLS[cell].num_states
        none = (None,) * n  # no initial states: zero, no arrays (ZS)
        zs = (1 << n) - 1  # the backward's mask of them: every initial state zero
        for dname in args.dtypes.split(","):
            dtype = getattr(mx, dname)
            for H in (int(v) for v in args.hiddens.split(",")):
                for B in (int(v) for v in args.batches.split(",")):
                    xp, w_h, _, params, cots = make_problem(cell, B, L, H, dtype) if cell != "slstm" else \
                        _slstm_problem(B, L, H, dtype)
                    for direction in args.directions.split(","):
                        cands = [("tiled", P.select(direction, cell, xp, w_h))]
                        cands += [("resident", p) for p in resident_candidates(
                            direction, cell, H, B, limits, dtype, tuple(int(k) for k in args.k_splits.split(",")))]
                        cands = [(k, p) for k, p in cands if p is not None]
                        if not cands:
                            continue
                        hp = prevs = None
                        if direction == "backward":
                            k0, _ = cands[0]
                            fp = (P.select if k0 == "tiled" else R.select)("forward", cell, xp, w_h)
                            if fp is None:
                                continue
                            fwd_out = (P.persistent_sequence(cell, xp, w_h, none, params, True, use_plan=fp)
                                       if k0 == "tiled" else R.run_forward(fp, xp, w_h, none, params, True))
                            # as a layer called without states runs it: each state's own
                            # sequence, shifted by a step in the kernel (ZS; kernels/contract.py)
                            seqs, hp = fwd_out[:n], fwd_out[n]
                            prevs = seqs
                            mx.eval(hp, prevs)
                        first = None
                        for klass, p in cands:
                            if direction == "forward":
                                # (every name a job uses bound now: jobs run after the loops)
                                fn = (lambda p=p, a=(xp, w_h, none, params), c=cell: P.persistent_sequence(
                                    c, a[0], a[1], a[2], a[3], True, use_plan=p)) if klass == "tiled" else \
                                    (lambda p=p, a=(xp, w_h, none, params): R.run_forward(p, *a, True))
                            else:
                                a = (cots, xp, hp, prevs, params, w_h)
                                fn = (lambda p=p, a=a, zs=zs, c=cell: P.persistent_backward(
                                    c, *a, False, use_plan=p, zero_states=zs)[:2]) \
                                    if klass == "tiled" else \
                                    (lambda p=p, a=a, zs=zs: R.run_backward(p, *a, False, zero_states=zs)[:2])
                            split = (f"U{p.U} NU{p.NU} BB{p.BB}x{p.NBB}" if klass == "tiled"
                                     else f"BB{p.BB} RPT{p.RPT} RS{p.RS} K{p.KSP} T{p.TPB}")
                            rec = {"cell": cell, "dtype": dname, "B": B, "H": H, "L": L, "direction": direction,
                                   "class": klass, "split": split, "BB": p.BB,
                                   "RPT": getattr(p, "RPT", 0), "KSP": getattr(p, "KSP", 1), "smem": p.smem}
                            try:
                                out = fn()
                                mx.eval(out)
                                if first is None:
                                    first = out
                                rec["diff"] = diff(out, first)
                                jobs.append((rec, fn))
                            except Exception as e:  # noqa: BLE001
                                rec["error"] = repr(e)[:300]
                                results.append(rec)
    print(f"kernel_classes_tune: {len(jobs)} kernels built", flush=True)
    if args.compile_only:
        return
    lock = open(args.lock, "a+") if args.lock else None
    if lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
    print(f"{'cell':8} {'dtype':8} {'B':>4} {'H':>5} dir {'class':8} {'split':22} {'ms':>8} {'us/step':>8} diff")
    for rec, fn in jobs:
        try:
            rec["ms"] = timeit(fn, args.warmup, args.repeats)
        except Exception as e:  # noqa: BLE001
            rec["error"] = repr(e)[:300]
        results.append(rec)
        ms = rec.get("ms")
        print(f"{rec['cell']:8} {rec['dtype']:8} {rec['B']:4} {rec['H']:5} {rec['direction'][:3]} {rec['class']:8} "
              f"{rec['split']:22} {(f'{ms:8.3f}' if ms else '     err')} "
              f"{(f'{ms * 1000 / L:8.2f}' if ms else '       -')} "
              f"{rec.get('diff', float('nan')):.1e} {rec.get('error', '')}", flush=True)
        if len(results) % 25 == 0:
            dump()
    if lock:
        fcntl.flock(lock, fcntl.LOCK_UN)
    dump()
    if args.write_table:
        write_table(results, meta, args.write_table)


def _slstm_problem(B, L, H, dtype):
    ks = mx.random.split(mx.random.key(0), 4)
    xp = (mx.random.normal((L, B, 4 * H), key=ks[0]) * 0.5).astype(dtype)
    w_h = mx.random.uniform(-1, 1, (4 * H, H), key=ks[1]) / (H ** 0.5)
    s0 = tuple(mx.zeros((B, H)) for _ in range(4))
    cots = tuple(mx.random.normal((L, B, H), key=ks[2 + min(i, 1)]) for i in range(4))
    mx.eval(xp, w_h, s0, cots)
    return xp, w_h, s0, (), cots


def merge(paths, out_json, table_path):
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"kernel_classes_tune: skipping {path}: {e}")
    if not runs:
        raise SystemExit("kernel_classes_tune: nothing to merge")
    meta = dict(runs[0]["meta"], command="merge of " + ", ".join(r["meta"]["command"] for r in runs))
    # runs of different dates (e.g. one cell re-used from an older table): each date with its cells
    dates = {}
    for r in runs:
        dates.setdefault(r["meta"]["started"], set()).update(rec["cell"] for rec in r["results"])
    if len(dates) > 1:
        meta["started"] = "; ".join(f"{'/'.join(sorted(c))} {d}" for d, c in sorted(dates.items(), reverse=True))
    results = [rec for r in runs for rec in r["results"]]
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    if table_path:
        write_table(results, meta, table_path)


def write_table(results, meta, path=TABLE):
    best = {}
    for r in results:
        if "ms" not in r:
            continue
        key = (r["cell"], r["direction"], r["dtype"], r["B"], r["H"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    table = {}
    for (cell, direction, dtype, B, H), r in sorted(best.items()):
        point = (B, H, r["class"], r["BB"], r["RPT"])
        table.setdefault((cell, direction, dtype), []).append(point + ((r["KSP"],) if r.get("KSP", 1) > 1 else ()))
    with open(path, "w") as f:
        f.write('"""Measured kernel-class choices (written by benchmarks/kernel_classes_tune.py; do not edit).\n\n'
                f"{meta['host']}, mlx {meta['mlx']}, {meta['limits']['num_sms']} SMs, L={meta['length']}, "
                f"{meta['started']}. Per (cell, direction, dtype): (B, H, class, rows per block,\n"
                'rows per thread[, threads per unit when > 1]) of the fastest candidate at each measured point.\n"""\n\n')
        f.write("SELECTION = " + pprint.pformat(table, width=110, compact=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
