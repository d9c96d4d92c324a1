"""A/B of one environment switch in one process, in alternating rounds (CUDA or any device).

    python benchmarks/env_ab.py --env MLX_FASTRNN_PERSISTENT_MMA --values ,0 \
        --layers LSTM:128x200x512:float32,GRU:64x256x256:bfloat16 \
        --flashrnn lstm:64x256:4x256:bfloat16 --json /tmp/ab.json

The planners read the environment at every call (and the kernel-class cache is keyed
by it), so both settings are the same layer on the same arrays: each configuration is
built once per setting and compiled (first call), then timed in ``--rounds`` rounds
that alternate the order of the settings. Reports per configuration and mode (fwd,
fwd+bwd) the median ms of each setting and their ratio (A / B). ``--values``: the two
values, an empty one meaning unset. ``--wait-for FILE``: time only once FILE exists
(compile while something else, e.g. the GPU suite, still runs; start timing after).
Configurations: ``--layers`` the drop-in layers (``recurrent_bench.make_case``:
``Layer:BxLxH:dtype``), ``--flashrnn`` ``mlx_fastrnn.flashrnn`` calls
(``function:BxT:NxD:dtype``, ``flashrnn_bench.make_run``).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import mlx.core as mx

HERE = os.path.dirname(os.path.abspath(__file__))
for p in (os.path.dirname(HERE), HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import flashrnn_bench  # noqa: E402
from recurrent_bench import make_case  # noqa: E402


def parse_cases(layers, flash):
    """``[(label, builder(mode))]`` from the ``--layers`` / ``--flashrnn`` specs."""
    cases = []
    for spec in filter(None, (s.strip() for s in layers.split(","))):
        name, shape, dtype = spec.split(":")
        b, length, h = (int(v) for v in shape.split("x"))
        cases.append((f"{name} {shape} {dtype}",
                      lambda mode, name=name, b=b, length=length, h=h, dtype=dtype:
                      make_case(name, (f"{b}x{length}x{h}", b, length, h), mode, dtype)))
    for spec in filter(None, (s.strip() for s in flash.split(","))):
        fn, bt, nd, dtype = spec.split(":")
        b, t = (int(v) for v in bt.split("x"))
        n, d = (int(v) for v in nd.split("x"))
        cases.append((f"flashrnn {fn} B={b} T={t} N={n} D={d} {dtype}",
                      lambda mode, fn=fn, b=b, t=t, n=n, d=d, dtype=dtype:
                      flashrnn_bench.make_run(fn, b, t, n, d, dtype, mode)))
    return cases


# MLX's own switches that it reads once per process (its first kernel): switching them
# here would change what mlx_fastrnn plans for but not what MLX does (with the graphs
# switch, cluster plans under CUDA graphs: wrong results).
READ_ONCE_BY_MLX = ("MLX_USE_CUDA_GRAPHS", "MLX_ENABLE_TF32")


def with_env(name, value, fn):
    """``fn()`` with ``name`` set to ``value`` (unset when empty), restored after."""
    old = os.environ.get(name)
    if value == "":
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def timed(run, n):
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        run()
    mx.synchronize()
    return (time.perf_counter() - t) * 1e3 / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", required=True, help="the environment variable to switch")
    ap.add_argument("--values", required=True, help="A,B (an empty value: unset)")
    ap.add_argument("--layers", default="", help="Layer:BxLxH:dtype,...")
    ap.add_argument("--flashrnn", default="", help="function:BxT:NxD:dtype,...")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-ms", type=float, default=60.0, help="timed ms per setting and round (about)")
    ap.add_argument("--wait-for", default=None, help="time only once this file exists")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.env in READ_ONCE_BY_MLX:
        ap.error(f"{args.env} is read once per process by MLX: an in-process A/B cannot switch it")
    values = args.values.split(",")
    if len(values) != 2:
        ap.error("--values takes two comma-separated values")
    cases = parse_cases(args.layers, args.flashrnn)
    if not cases:
        ap.error("nothing to time: give --layers and / or --flashrnn")
    meta = dict(tool="env_ab", command=" ".join(sys.argv), env=args.env, values=values,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                mlx_version=mx.__version__, device=str(mx.default_device()))
    runs = {}
    t0 = time.time()
    for label, build in cases:
        for mode in args.modes.split(","):
            for v in values:
                try:
                    run = build(mode)
                    with_env(args.env, v, run)  # compile (and warm) under this setting
                    runs[(label, mode, v)] = run
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"build error: {label} {mode} {args.env}={v!r}: {e!r}"[:300], flush=True)
    print(f"built in {time.time() - t0:.0f} s", flush=True)
    while args.wait_for and not os.path.exists(args.wait_for):
        time.sleep(0.5)
    results = []
    for label, _ in cases:
        for mode in args.modes.split(","):
            ra, rb = runs.get((label, mode, values[0])), runs.get((label, mode, values[1]))
            if ra is None or rb is None:
                continue
            one = with_env(args.env, values[0], lambda: timed(ra, 1))
            n = max(1, min(50, int(args.round_ms / max(one, 0.05))))
            ta, tb = [], []
            for k in range(args.rounds):
                order = ((values[0], ra, ta), (values[1], rb, tb))
                for v, r, acc in order[:: 1 if k % 2 == 0 else -1]:
                    acc.append(with_env(args.env, v, lambda: timed(r, n)))
            row = dict(case=label, mode=mode, a=values[0], b=values[1], a_ms=statistics.median(ta),
                       b_ms=statistics.median(tb), calls_per_round=n, rounds=args.rounds)
            results.append(row)
            print(f"{label} {mode}: {args.env}={values[0] or '(unset)'} {row['a_ms']:.3f} ms, "
                  f"={values[1] or '(unset)'} {row['b_ms']:.3f} ms, A/B {row['a_ms'] / row['b_ms']:.2f}",
                  flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(meta=meta, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
