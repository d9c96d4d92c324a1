"""Time mlx_fastrnn.flashrnn (FlashRNN's function, backend "fused") on FlashRNN's benchmark grid.

    python benchmarks/flashrnn_bench.py                                   # the default grid
    python benchmarks/flashrnn_bench.py --functions slstm --heads 4 --dims 128 --batches 16 \
        --lengths 1024 --dtype bfloat16 --json /tmp/flashrnn.json

Each config: ``Wx [B, T, 4, N, D]`` (input pre-activations), ``R [4, N, D, D]``,
``b [4, N, D]``, zero initial states; ``fwd`` evaluates ``(states_seq,
last_states)``, ``fwdbwd`` the gradients of ``mean(states_seq[0])`` w.r.t. Wx,
R and b. Timing as recurrent_bench.py (warm-up on a length-2 twin, median of
repeats adapted to --budget). FlashRNN itself runs only under PyTorch on
NVIDIA GPUs: time it in its own process (its ``cuda`` / ``triton_fused``
backends) and compare in one session.
"""

import argparse
import datetime
import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shapes import FLASHRNN_GATES, add_flashrnn_grid_args, flashrnn_grid  # noqa: E402
from recurrent_bench import MX_DTYPES, device_meta, fmt_ms, measure, write_json  # noqa: E402

try:
    import mlx_fastrnn
except ImportError:  # a checkout without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import mlx_fastrnn

def make_run(function, batch, length, heads, dim, dtype, mode, seed=0):
    gx, gr, gb = FLASHRNN_GATES[function]
    ks = mx.random.split(mx.random.key(seed), 3)
    dt = MX_DTYPES[dtype]
    wx = mx.random.normal((batch, length, gx, heads, dim), key=ks[0]).astype(dt)
    r = (mx.random.normal((gr, heads, dim, dim), key=ks[1]) / dim ** 0.5).astype(dt)
    b = mx.random.normal((gb, heads, dim), key=ks[2]).astype(dt)
    mx.eval(wx, r, b)
    if mode == "fwd":
        def run():
            out = mlx_fastrnn.flashrnn(wx, r, b, None, function)
            mx.eval(out)
            return out
        return run
    grad = mx.grad(lambda wx, r, b: mlx_fastrnn.flashrnn(wx, r, b, None, function)[0][0]
                   .astype(mx.float32).mean(), argnums=(0, 1, 2))

    def run():
        g = grad(wx, r, b)
        mx.eval(g)
        return g
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flashrnn_grid_args(p)
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    meta = dict(tool="flashrnn_bench", command=" ".join(sys.argv), mlx_version=mx.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **device_meta())
    grid = flashrnn_grid(args)
    results = []
    print(f"{'dtype':8} {'function':8} {'N':>3} {'D':>4} {'B':>3} {'T':>5} {'mode':6} {'ms':>16}")
    for i, (dtype, fn, n, d, b, t, mode) in enumerate(grid):
        print(f"[{i + 1}/{len(grid)}]", file=sys.stderr, flush=True)
        row = dict(dtype=dtype, function=fn, heads=n, dim=d, batch=b, length=t, mode=mode)
        try:
            stats, _ = measure(make_run(fn, b, t, n, d, dtype, mode), budget=args.budget,
                               prewarm=make_run(fn, b, 2, n, d, dtype, mode))
            row.update(stats)
        except Exception as e:  # noqa: BLE001 - keep going, record it
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            stats = None
        results.append(row)
        print(f"{dtype:8} {fn:8} {n:>3} {d:>4} {b:>3} {t:>5} {mode:6} {fmt_ms(stats):>16}", flush=True)
        write_json(args.json, meta, results)
        mx.clear_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
