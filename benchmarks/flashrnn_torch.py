"""Time FlashRNN itself (PyTorch, its own process) on the grid of flashrnn_bench.py.

    python benchmarks/flashrnn_torch.py --backends cuda,triton_fused --json /tmp/flashrnn_torch.json
    python benchmarks/flashrnn_torch.py --build-only --part 3/8 ...   # build kernels only, one eighth

The baseline side of ``flashrnn_bench.py`` (which times ``mlx_fastrnn.flashrnn``):
the same grid options, the same tensors' shapes and distributions (``Wx`` normal,
``R`` normal / sqrt(D), ``b`` normal, zero initial states), the same modes —
``fwd``: ``flashrnn(...)`` under ``torch.no_grad()``; ``fwdbwd``: the gradients
of ``mean(states_seq[0])`` w.r.t. Wx, R and b. Needs torch with CUDA and
``flashrnn`` (1.0.8: ``pip install --no-deps``); never imports MLX (MLX's CUDA
build and torch clash on cuDNN in one process).

FlashRNN compiles a kernel per (function, dtype, N, D, B) for ``cuda`` (nvcc,
torch's extension cache) and per config for ``triton_fused`` (Triton's cache);
``--build-only`` runs every config once at T=2 so that several processes
(``--part i/n``) build in parallel before one process times; a config whose
build or run fails records its error and the grid goes on. Timing: CUDA
events, warm-up, median of repeats adapted to ``--budget``.
"""

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shapes import (FLASHRNN_GATES, add_flashrnn_grid_args, flashrnn_grid, torch_timed_ms,  # noqa: E402
                          write_json)


def make_run(torch, flashrnn, backend, function, batch, length, heads, dim, dtype, mode, seed=0):
    gx, gr, gb = FLASHRNN_GATES[function]
    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=gen)
    wx = torch.randn((batch, length, gx, heads, dim), **kw).to(dt)
    r = (torch.randn((gr, heads, dim, dim), **kw) / dim ** 0.5).to(dt)
    b = torch.randn((gb, heads, dim), **kw).to(dt)

    def call(wx, r, b):
        return flashrnn(wx, r, b, None, function=function, backend=backend, dtype=dtype)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return call(wx, r, b)
        return run
    leaves = [t.detach().requires_grad_(True) for t in (wx, r, b)]

    def run():
        for t in leaves:
            t.grad = None
        seq, _ = call(*leaves)
        seq[0].float().mean().backward()
        return [t.grad for t in leaves]
    return run


def measure(torch, run, budget, min_repeats=3, max_repeats=100):
    first = torch_timed_ms(torch, run)
    last = torch_timed_ms(torch, run)
    repeats = int(min(max_repeats, max(min_repeats, budget * 1e3 / max(last, 1e-3))))
    times = [torch_timed_ms(torch, run) for _ in range(repeats)]
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return dict(median_ms=statistics.median(times), iqr_ms=q[2] - q[0], repeats=len(times), first_ms=first)


def configs(args):
    """``[(backend, dtype, function, N, D, B, T, mode)]`` this process runs: each config
    of the grid on every backend in turn; with ``--build-only`` one T=2 config per kernel FlashRNN builds
    (keyed by function, dtype, N, D, B: not T nor the mode); ``--part i/n`` every
    n-th from the i-th."""
    part, parts = (int(v) for v in args.part.split("/"))
    if not 1 <= part <= parts:
        raise SystemExit(f"--part {args.part}: want i/n with 1 <= i <= n")
    # every backend per config, in turns: a run cut short by its time limit has timed
    # each backend on the same configs
    grid = [(be, *cfg) for cfg in flashrnn_grid(args) for be in args.backends.split(",")]
    if args.build_only:
        grid = sorted({(be, dt, fn, n, d, b, 2, "fwdbwd") for be, dt, fn, n, d, b, _, _ in grid})
    return grid[part - 1::parts]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flashrnn_grid_args(p)
    p.add_argument("--backends", default="cuda,triton_fused",
                   help="comma-separated FlashRNN backends (cuda, cuda_fused, triton_fused, vanilla)")
    p.add_argument("--budget", type=float, default=0.3, help="seconds of timed calls per config")
    p.add_argument("--build-only", action="store_true", help="run each config once at T=2, time nothing")
    p.add_argument("--part", default="1/1", help="i/n: only every n-th config, from the i-th")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
        from flashrnn import flashrnn
    except Exception as e:  # noqa: BLE001 - no torch / flashrnn: nothing to time
        print(f"flashrnn_torch: {type(e).__name__}: {e}; nothing to do.")
        return 0
    if not torch.cuda.is_available():
        print("flashrnn_torch: FlashRNN runs on CUDA only; nothing to do.")
        return 0
    grid = configs(args)
    import flashrnn as flashrnn_pkg
    meta = dict(tool="flashrnn_torch", command=" ".join(sys.argv),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch_version=torch.__version__, cuda_version=torch.version.cuda,
                flashrnn_version=getattr(flashrnn_pkg, "__version__", "1.0.8?"),
                device_name=torch.cuda.get_device_name(0), budget_s=args.budget, build_only=args.build_only)
    results = []
    print(f"{'backend':13} {'dtype':8} {'function':8} {'N':>3} {'D':>4} {'B':>3} {'T':>5} {'mode':6} {'ms':>10}")
    for i, (backend, dtype, fn, n, d, b, t, mode) in enumerate(grid):
        row = dict(backend=backend, dtype=dtype, function=fn, heads=n, dim=d, batch=b, length=t, mode=mode)
        t0 = time.perf_counter()
        try:
            run = make_run(torch, flashrnn, backend, fn, b, t, n, d, dtype, mode)
            if args.build_only:
                run()
                torch.cuda.synchronize()
                row["build_s"] = round(time.perf_counter() - t0, 1)
                text = f"{row['build_s']:.1f}s"
            else:
                row.update(measure(torch, run, args.budget))
                text = f"{row['median_ms']:.3f}"
        except Exception as e:  # noqa: BLE001 - a backend that does not build or run here: record it
            row["error"] = f"{type(e).__name__}: {e}"[:400]
            text = "error"
        results.append(row)
        print(f"{backend:13} {dtype:8} {fn:8} {n:>3} {d:>4} {b:>3} {t:>5} {mode:6} {text:>10}  [{i + 1}/{len(grid)}]",
              flush=True)
        write_json(args.json, meta, results)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
