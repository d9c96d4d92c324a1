"""Benchmark mlx_fastrnn's GRU / LSTM / RNN against stock mlx.nn.

    python benchmarks/recurrent_bench.py                       # the impl MLX_RNN_IMPL picks (default fast)
    MLX_RNN_IMPL=legacy python benchmarks/recurrent_bench.py   # stock mlx.nn
    python benchmarks/recurrent_bench.py --compare             # both in one process + speed-up column
    python benchmarks/recurrent_bench.py --compare --dtype bfloat16 --layers gru,lstm \
        --shapes 32x40x200,1x1x640 --modes fwdbwd --json /tmp/out.json

Runs on ``mx.default_device()`` (the GPU when there is one). Every config is one
layer ``(hidden=input)`` on a batch-first input ``[B, L, H]``:

- ``fwd``: ``layer(x)``, all outputs evaluated.
- ``fwdbwd``: ``mx.value_and_grad`` of ``mean(h)`` w.r.t. ALL the layer's
  trainable parameters and the input (what ``nn.value_and_grad`` does, plus the
  input), loss and every gradient evaluated.

Length-1 shapes (streaming) pass a carried state (``hidden``, and ``cell`` for
LSTM) as a streaming loop would.

Timing: a length-2 twin of the case runs first (compilation and kernel JIT are
keyed on the per-step shapes, so they happen there; a case of length <= 2 runs
once itself), then warm-up calls (at
least one), then ``repeats`` timed calls, each ending in ``mx.eval`` (which
waits for the device). ``repeats`` adapts to ``--budget`` seconds per config
and impl, between ``--min-repeats`` and ``--max-repeats``. A config whose first
call takes longer than ``--slow`` seconds is timed by that one call only
(flagged ``single_call``, ``*`` in the table): on a slow CPU the large shapes
take up to a minute per call.

With ``--compare`` both impls run on layers built from the same seed (same
weights and inputs) and their results are checked, at no extra timing cost:
``rel.diff`` = max|fast - legacy| / max|legacy| over the outputs (fwd) or the
loss and every gradient (fwdbwd), worst leaf. For bfloat16/float16 each impl is
also compared with a float32 stock run on the same rounded weights and inputs
(``err leg`` / ``err fast``; one extra untimed call). ``--no-check`` skips both.
``--json`` is rewritten after every config, so a killed run keeps what it measured.
"""

import argparse
import contextlib
import datetime
import fcntl
import os
import platform
import socket
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shapes import (  # noqa: E402
    CPU_DEFAULT_SHAPES, DTYPES, LAYERS, MODES, SHAPES, is_streaming, parse_list, parse_shapes, write_json)

try:
    import mlx_fastrnn
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import mlx_fastrnn

MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


# ---------------------------------------------------------------------------
# cases


def make_case(layer_name, shape, mode, dtype="float32", seed=0, layer_cls=None, reference=False):
    """Build one benchmark case; returns ``run()`` (does the work, evaluates, returns results).

    ``layer_cls`` defaults to ``mlx_fastrnn.<layer_name>``; which impl runs is
    decided when ``run()`` is called (``MLX_RNN_IMPL`` / ``use_impl``).
    The same ``seed`` gives the same weights and inputs. ``reference=True``
    builds the float32 twin of a low-precision case: the same values (rounded
    to ``dtype``), held and computed in float32.
    """
    _, batch, length, hidden = shape
    dt = MX_DTYPES[dtype]
    mx.random.seed(seed)
    cls = layer_cls or getattr(mlx_fastrnn, layer_name)
    layer = cls(hidden, hidden)

    def cast(a):
        a = a.astype(dt)
        return a.astype(mx.float32) if reference else a

    if dt != mx.float32:
        layer.set_dtype(dt)
        if reference:
            layer.set_dtype(mx.float32)
    x = cast(mx.random.normal((batch, length, hidden)))
    carried = ()
    if is_streaming(shape):
        n_states = 2 if layer_name == "LSTM" else 1
        carried = tuple(cast(0.5 * mx.random.normal((batch, hidden))) for _ in range(n_states))
    mx.eval(layer.parameters(), x, carried)

    def forward(x):
        return layer(x, *carried)

    if mode == "fwd":

        def run():
            out = forward(x)
            mx.eval(out)
            return out

        return run

    if mode != "fwdbwd":
        raise ValueError(f"unknown mode {mode!r}")

    def loss_fn(params, x):
        layer.update(params)
        out = forward(x)
        h = out[0] if isinstance(out, (tuple, list)) else out
        return h.astype(mx.float32).mean()

    value_and_grad = mx.value_and_grad(loss_fn, argnums=(0, 1))
    params = layer.trainable_parameters()

    def run():
        loss, grads = value_and_grad(params, x)
        mx.eval(loss, grads)
        return loss, grads

    return run


# ---------------------------------------------------------------------------
# timing


def measure(run, budget=1.0, min_repeats=3, max_repeats=100, max_warmup=3, slow=None, prewarm=None):
    """Warm up, then time ``run`` (which must evaluate its results). Returns (stats, last result).

    ``prewarm`` (optional, cheap) is called first: a short-sequence twin of the
    case, so compilation and kernel JIT (keyed on the per-step shapes, not the
    length) are not in the first call. A first call slower than ``slow``
    seconds is followed by a second, and where that is slower than ``slow``
    too it is the only sample (the first may still compile what the twin did
    not: a kernel chosen by the length). Otherwise at least one more warm-up follows
    (its time sets the number of repeats), and more while they fit in a
    quarter of ``budget``.
    """
    prewarm_ms = None
    if prewarm is not None:
        t0 = time.perf_counter()
        prewarm()
        prewarm_ms = (time.perf_counter() - t0) * 1e3
    mx.synchronize()
    t0 = time.perf_counter()
    result = run()
    first = last = time.perf_counter() - t0
    warmup = 1
    if slow is not None and first > slow:
        t0 = time.perf_counter()
        result = run()
        last = time.perf_counter() - t0
        warmup = 2
        if last > slow:
            return _stats([last], warmup=1, first_ms=first * 1e3, prewarm_ms=prewarm_ms,
                          single_call=True), result
    spent = 0.0
    while warmup < 2 or (warmup < max_warmup and spent + last < 0.25 * budget):
        t0 = time.perf_counter()
        result = run()
        last = time.perf_counter() - t0
        spent += last
        warmup += 1
    repeats = int(min(max_repeats, max(min_repeats, budget / max(last, 1e-6))))
    times = []
    for _ in range(repeats):
        result = None  # let the previous result go before the next call
        t0 = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - t0)
    return _stats(times, warmup=warmup, first_ms=first * 1e3, prewarm_ms=prewarm_ms,
                  single_call=False), result


def measure_interleaved(runs, budget=1.0, min_repeats=3, max_repeats=1000):
    """Time already warmed-up ``runs`` ({name: fn}) in alternating rounds, one call
    of each per round, the order flipped every round, so clock and thermal drift
    hit both alike. Returns {name: list of seconds}."""
    names = list(runs)
    t0 = time.perf_counter()
    for name in names:
        runs[name]()
    per_round = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(max_repeats, max(min_repeats, budget / per_round)))
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            runs[name]()  # evaluates; the result is dropped before the next call
            times[name].append(time.perf_counter() - t0)
    return times


def _stats(times, **extra):
    ms = sorted(t * 1e3 for t in times)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return dict(
        median_ms=statistics.median(ms),
        iqr_ms=q3 - q1,
        q1_ms=q1,
        q3_ms=q3,
        min_ms=ms[0],
        max_ms=ms[-1],
        repeats=len(ms),
        **extra,
    )


def rel_diff(a, b):
    """Worst ``max|a-b| / max|b|`` over the leaves of two result trees (float32 math)."""
    la = [v for _, v in tree_flatten(a)] if not isinstance(a, mx.array) else [a]
    lb = [v for _, v in tree_flatten(b)] if not isinstance(b, mx.array) else [b]
    worst = 0.0
    for u, v in zip(la, lb):
        u, v = u.astype(mx.float32), v.astype(mx.float32)
        scale = mx.max(mx.abs(v)).item()
        err = mx.max(mx.abs(u - v)).item()
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def _flatten_result(result):
    if isinstance(result, mx.array):
        return [result]
    if isinstance(result, (tuple, list)) and all(isinstance(r, mx.array) for r in result):
        return list(result)
    return [v for _, v in tree_flatten(result)]


# ---------------------------------------------------------------------------
# metadata and output


def device_meta():
    dev = mx.default_device()
    meta = {"device": str(dev), "device_type": "gpu" if dev.type == mx.gpu else "cpu"}
    try:
        info = mx.device_info()
        meta["device_name"] = str(info.get("device_name", ""))
        meta["device_info"] = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in info.items()}
    except Exception:  # older MLX
        pass
    if dev.type == mx.gpu:
        meta["backend"] = "metal" if mx.metal.is_available() else "cuda" if mx.cuda.is_available() else "?"
    else:
        meta["backend"] = "cpu"
    return meta


def machine_meta():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "uname": " ".join(platform.uname()),
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "python": sys.version.split()[0],
    }


def fmt_ms(stats):
    if stats is None:
        return "-"
    m = stats["median_ms"]
    digits = 3 if m < 1 else 2 if m < 100 else 1 if m < 1000 else 0
    if stats.get("single_call"):
        return f"{m:.{digits}f}*"
    return f"{m:.{digits}f} ±{stats['iqr_ms']:.{digits}f}"


# ---------------------------------------------------------------------------
# main


def _progress(done, total, elapsed, what):
    """One line on stderr before each config: where the run is and about how long is left."""
    left = f", ~{elapsed / done * (total - done):.0f} s left" if done else ""
    print(f"[{done + 1}/{total}, {elapsed:.0f} s{left}] {what}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", action="store_true",
                   help="run legacy and fast (use_impl) in one process and print the speed-up")
    p.add_argument("--dtype", default="float32",
                   help=f"one or more of {','.join(DTYPES)} (comma-separated)")
    p.add_argument("--layers", default=None, help="comma-separated subset of GRU,LSTM,RNN")
    p.add_argument("--shapes", default=None,
                   help="comma-separated BxLxH (input = H), indices, or 'all'; default: on a GPU "
                        "(or with --full) 32x40x200,64x256x256,16x1024x512,16x100x32,1x1x640, on a "
                        "CPU the small ones 32x40x200,16x100x32,1x1x640 (about a minute on 2 cores)")
    p.add_argument("--full", action="store_true",
                   help="on a CPU too, every benchmark shape (the big ones take minutes there)")
    p.add_argument("--modes", default=None, help="comma-separated subset of fwd,fwdbwd")
    p.add_argument("--budget", type=float, default=1.0,
                   help="seconds of timed calls per config and impl (adapts repeats; default 1.0)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--max-repeats", type=int, default=100)
    p.add_argument("--warmup", type=int, default=3, help="most warm-up calls (default 3)")
    p.add_argument("--slow", type=float, default=2.0,
                   help="a config whose first call takes longer than this (s) is timed by "
                        "that call only (default 2.0; 0 disables)")
    p.add_argument("--interleave-below", type=float, default=2.0, metavar="MS",
                   help="with --compare, configs where both medians are below this are timed again "
                        "in alternating legacy/fast rounds (up to 1000), and those times are reported "
                        "(default 2.0; 0 disables)")
    p.add_argument("--json", default=None, metavar="PATH", help="write results here (after every config)")
    p.add_argument("--no-check", action="store_true",
                   help="with --compare, skip the result checks (fast vs legacy; low precision vs float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lock", default=None, metavar="PATH",
                   help="time each config only while holding this file's lock, its compile (the "
                        "length-2 prewarm) outside it: several processes (say one per layer) then "
                        "compile in parallel and take turns on the GPU")
    return p.parse_args(argv)


@contextlib.contextmanager
def _locked(path):
    if path is None:
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv=None):
    args = parse_args(argv)
    dtypes = parse_list(args.dtype, DTYPES, "dtype")
    layers = parse_list(args.layers, LAYERS, "layer")
    on_gpu = mx.default_device().type == mx.gpu
    shapes = parse_shapes(args.shapes, default=SHAPES if (on_gpu or args.full) else CPU_DEFAULT_SHAPES)
    modes = parse_list(args.modes, MODES, "mode")
    impls = ["legacy", "fast"] if args.compare else [mlx_fastrnn.IMPL]
    slow = args.slow if args.slow and args.slow > 0 else None

    meta = {
        "tool": "recurrent_bench",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mlx_version": mx.__version__,
        "mlx_fastrnn_version": getattr(mlx_fastrnn, "__version__", "?"),
        "impl": "compare" if args.compare else mlx_fastrnn.IMPL,
        "impls": impls,
        "env_MLX_RNN_IMPL": os.environ.get("MLX_RNN_IMPL"),
        "dtypes": dtypes,
        "budget_s": args.budget,
        "min_repeats": args.min_repeats,
        "slow_s": slow,
        **device_meta(),
        "machine": machine_meta(),
        "complete": False,
    }
    results = []
    write_json(args.json, meta, results)

    print(f"# mlx_fastrnn recurrent benchmark: device {meta['device']} ({meta['backend']}"
          f"{', ' + meta['device_name'] if meta.get('device_name') else ''}), mlx {mx.__version__}, "
          f"impl {meta['impl']}, {datetime.date.today()}")
    print("# median ms ±IQR over repeats; * = one call only (first call > --slow s)"
          + ("; speed-up = legacy / fast" if args.compare else ""))
    check_ref = args.compare and not args.no_check
    if args.compare:
        header = (f"{'dtype':8} {'layer':5} {'shape BxLxH':12} {'mode':6} {'legacy ms':>16} {'fast ms':>16} "
                  f"{'speed-up':>8} {'n':>7} {'rel.diff':>8}")
        if check_ref and any(d != "float32" for d in dtypes):
            header += f" {'err leg':>8} {'err fast':>8}"
    else:
        header = f"{'dtype':8} {'layer':5} {'shape BxLxH':12} {'mode':6} {impls[0] + ' ms':>16} {'n':>4}"
    print(header)
    print("-" * len(header))
    if check_ref:
        print("# rel.diff = max|fast - legacy| / max|legacy| over all outputs (fwd) or loss and gradients "
              "(fwdbwd), worst leaf;\n# err leg / err fast (low precision) = the same against a float32 "
              "stock run on the same (rounded) weights and inputs")
    sys.stdout.flush()

    def with_impl(fn, impl):
        if not args.compare:
            return fn

        def call():
            with mlx_fastrnn.use_impl(impl):
                return fn()

        return call

    t_start = time.perf_counter()
    worst = []
    total = len(dtypes) * len(layers) * len(shapes) * len(modes)
    done = 0
    if not on_gpu and args.shapes is None and not args.full:
        print("# CPU: the small shapes only (--full for all)", flush=True)
    for dtype in dtypes:
        for layer_name in layers:
            for shape in shapes:
                for mode in modes:
                    _progress(done, total, time.perf_counter() - t_start,
                              f"{dtype} {layer_name} {shape[0]} {mode}")
                    done += 1
                    row_stats, outs, rows, runs = {}, {}, {}, {}
                    for impl in impls:
                        base = dict(layer=layer_name, shape=shape[0], batch=shape[1], length=shape[2],
                                    hidden=shape[3], input=shape[3], mode=mode, dtype=dtype, impl=impl,
                                    streaming=is_streaming(shape))
                        try:
                            run = with_impl(make_case(layer_name, shape, mode, dtype, seed=args.seed), impl)
                            # compile / JIT the steps first, on a length-2 twin (or the case itself if short)
                            prewarm = run
                            if shape[2] > 2:
                                short = (shape[0], shape[1], 2, shape[3])
                                prewarm = with_impl(make_case(layer_name, short, mode, dtype, seed=args.seed), impl)
                            if args.lock:
                                prewarm()
                            with _locked(args.lock):
                                stats, out = measure(run, budget=args.budget,
                                                     min_repeats=args.min_repeats,
                                                     max_repeats=args.max_repeats, max_warmup=args.warmup,
                                                     slow=slow, prewarm=None if args.lock else prewarm)
                            outs[impl] = out
                            row_stats[impl] = stats
                            rows[impl] = {**base, **stats}
                            runs[impl] = run
                        except Exception as e:  # keep going; record the failure
                            msg = f"{type(e).__name__}: {e}"
                            print(f"# {dtype} {layer_name} {shape[0]} {mode} {impl}: FAILED {msg[:300]}",
                                  flush=True)
                            rows[impl] = {**base, "error": msg[:2000]}
                            row_stats[impl] = None
                        run = prewarm = None
                    ok = [row_stats.get(i) for i in impls]
                    if (args.compare and args.interleave_below > 0 and len(runs) == len(impls)
                            and all(st and not st.get("single_call") for st in ok)
                            and max(st["median_ms"] for st in ok) < args.interleave_below):
                        timed = measure_interleaved(runs, budget=args.budget, min_repeats=args.min_repeats)
                        for impl in impls:
                            old = row_stats[impl]
                            st = _stats(timed[impl], warmup=old["warmup"], first_ms=old["first_ms"],
                                        prewarm_ms=old["prewarm_ms"], single_call=False, interleaved=True)
                            row_stats[impl] = st
                            rows[impl].update(st)
                    runs.clear()
                    extra = ""
                    if args.compare:
                        leg, fast = row_stats.get("legacy"), row_stats.get("fast")
                        speed = (f"{leg['median_ms'] / fast['median_ms']:.2f}x"
                                 if leg and fast and fast["median_ms"] > 0 else "-")
                        diff = "-"
                        if check_ref and "legacy" in outs and "fast" in outs:
                            # make_case built both from the same seed: same weights and inputs
                            d = rel_diff(_flatten_result(outs["fast"]), _flatten_result(outs["legacy"]))
                            diff = f"{d:.1e}"
                            rows["fast"]["rel_diff_vs_legacy"] = d
                            worst.append((d, dtype, layer_name, shape[0], mode))
                        if check_ref and dtype != "float32" and outs:
                            errs = {}
                            try:
                                ref_run = make_case(layer_name, shape, mode, dtype, seed=args.seed, reference=True)
                                with mlx_fastrnn.use_impl("legacy"):
                                    ref = _flatten_result(ref_run())
                                for impl, out in outs.items():
                                    errs[impl] = rel_diff(_flatten_result(out), ref)
                                    rows[impl]["rel_err_vs_f32"] = errs[impl]
                                ref = ref_run = None
                            except Exception as e:
                                print(f"# float32 reference failed: {type(e).__name__}: {e}", flush=True)
                            extra = "".join(f" {errs[i]:>8.1e}" if i in errs else f" {'-':>8}" for i in impls)
                        n = "/".join(str(s["repeats"]) if s else "-" for s in (leg, fast))
                        print(f"{dtype:8} {layer_name:5} {shape[0]:12} {mode:6} {fmt_ms(leg):>16} "
                              f"{fmt_ms(fast):>16} {speed:>8} {n:>7} {diff:>8}{extra}", flush=True)
                    else:
                        s = row_stats[impls[0]]
                        print(f"{dtype:8} {layer_name:5} {shape[0]:12} {mode:6} {fmt_ms(s):>16} "
                              f"{(s['repeats'] if s else '-'):>4}", flush=True)
                    results.extend(rows[i] for i in impls if i in rows)
                    outs.clear()
                    write_json(args.json, meta, results)
                    mx.clear_cache()

    meta["complete"] = True
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    write_json(args.json, meta, results)
    print(f"# done in {meta['elapsed_s']} s" + (f"; results in {args.json}" if args.json else ""))
    if worst:
        d, *where = max(worst)
        print(f"# worst relative difference fast vs legacy: {d:.1e} ({' '.join(where)})")
    return 0 if not any("error" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
