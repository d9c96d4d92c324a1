"""PyTorch cuDNN baseline: torch.nn.GRU / LSTM / RNN on the shapes of recurrent_bench.py.

    python benchmarks/torch_baseline.py --json /tmp/torch.json
    python benchmarks/torch_baseline.py --dtype float32,bfloat16 --layers GRU --shapes 32x40x200

Run it in its OWN process, never where MLX is imported (on the CUDA machine
torch and MLX's CUDA build clash on cuDNN), with PYTHONPATH not pointing at
MLX's site (/tmp/mlx-site on the device machine). This file imports no MLX.

Same cases as recurrent_bench.py: one layer, hidden = input, batch_first,
``fwd`` = forward under ``torch.no_grad()`` (inference), ``fwdbwd`` = forward and
backward of ``mean(h)`` w.r.t. all parameters and the input. Length-1 shapes pass
a carried state as a streaming loop would. Timing: CUDA events around each call
plus a synchronize, median over repeats adapted to --budget seconds. Exits 0 with
a message when torch or CUDA is missing.

cuDNN weights: PyTorch's ``flatten_parameters`` skips bfloat16 (``cudnn.is_acceptable`` has
no bfloat16), yet the bfloat16 forward runs cuDNN, which then re-packs the weights on every
call. After the dtype change ``bench_shapes.flatten_cudnn_weights`` flattens them for
bfloat16 too and verifies it (one storage, no "contiguous chunk" warning); each result
records how in ``cudnn_flatten`` ("flatten_parameters", "bf16_forced", "failed"; "skipped"
on the CPU) and ``cudnn_used``. Only where that failed do results carry
``weights_repacked_per_call`` (``†`` in report.py's tables: a pessimistic baseline).
"""

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shapes import (  # noqa: E402
    DTYPES, LAYERS, MODES, flatten_after_first_call, flatten_cudnn_weights, flatten_remark,
    flatten_summary, is_streaming, open_torch, parse_list, parse_shapes, torch_timed_ms, write_json)

if "mlx" in sys.modules or "mlx.core" in sys.modules:
    sys.exit("torch_baseline.py must run in a process without MLX")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--layers", default=None, help="comma-separated subset of GRU,LSTM,RNN")
    p.add_argument("--shapes", default=None, help="comma-separated BxLxH (input = H) or indices")
    p.add_argument("--modes", default=None, help="comma-separated subset of fwd,fwdbwd")
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timed calls per config (default 0.5)")
    p.add_argument("--min-repeats", type=int, default=5)
    p.add_argument("--max-repeats", type=int, default=200)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cudnn-benchmark", action="store_true", help="set torch.backends.cudnn.benchmark")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no CUDA (slow)")
    p.add_argument("--json", default=None, metavar="PATH", help="write results here (after every config)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    opened = open_torch("torch_baseline", args.allow_cpu, args.cudnn_benchmark)
    if opened is None:
        return 0
    torch, device = opened
    cuda = device.type == "cuda"

    dtypes = parse_list(args.dtype, DTYPES, "dtype")
    layers = parse_list(args.layers, LAYERS, "layer")
    shapes = parse_shapes(args.shapes)
    modes = parse_list(args.modes, MODES, "mode")
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

    meta = {
        "tool": "torch_baseline",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "impl": "cudnn" if cuda else "torch-cpu",
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "cudnn_benchmark": bool(args.cudnn_benchmark),
        "device": str(device),
        "device_type": "gpu" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor(),
        "backend": "cudnn" if cuda else "cpu",
        "dtypes": dtypes,
        "budget_s": args.budget,
        "machine": {"uname": " ".join(platform.uname()), "hostname": socket.gethostname(),
                    "nproc": os.cpu_count(), "python": sys.version.split()[0]},
        "complete": False,
    }
    results = []
    write_json(args.json, meta, results)
    print(f"# torch baseline: {meta['device_name']}, torch {torch.__version__}, cuDNN "
          f"{meta['cudnn_version']}, {datetime.date.today()}; median ms ±IQR")
    header = f"{'dtype':8} {'layer':5} {'shape BxLxH':12} {'mode':6} {'cudnn ms':>16} {'n':>4}"
    print(header)
    print("-" * len(header))
    sys.stdout.flush()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn):
        return torch_timed_ms(torch, fn, cuda)

    if cuda:  # initialise CUDA, cuBLAS and cuDNN outside the first timed config
        warm_layer = torch.nn.LSTM(8, 8, batch_first=True).to(device)
        warm_layer(torch.randn(2, 3, 8, device=device))[0].sum().backward()
        sync()
        del warm_layer

    flatten_counts = {}
    t_start = time.perf_counter()
    for dtype in dtypes:
        for layer_name in layers:
            for shape in shapes:
                for mode in modes:
                    _, b, length, h = shape
                    base = dict(layer=layer_name, shape=shape[0], batch=b, length=length, hidden=h,
                                input=h, mode=mode, dtype=dtype, impl=meta["impl"],
                                streaming=is_streaming(shape))
                    try:
                        torch.manual_seed(args.seed)
                        cls = getattr(torch.nn, layer_name)
                        layer = cls(h, h, batch_first=True).to(device=device, dtype=tdt[dtype])
                        # one cuDNN weight buffer, bfloat16 included (else re-packed every call)
                        flat = flatten_cudnn_weights(torch, layer)
                        x = torch.randn(b, length, h, device=device, dtype=tdt[dtype])
                        state = None
                        if is_streaming(shape):
                            s = [0.5 * torch.randn(1, b, h, device=device, dtype=tdt[dtype])
                                 for _ in range(2 if layer_name == "LSTM" else 1)]
                            state = tuple(s) if layer_name == "LSTM" else s[0]

                        if mode == "fwd":
                            def fn():
                                with torch.no_grad():
                                    return layer(x, state)
                        else:
                            xg = x.clone().requires_grad_(True)
                            params = [p for p in layer.parameters()]

                            def fn():
                                out, _ = layer(xg, state)
                                loss = out.float().mean()
                                return torch.autograd.grad(loss, params + [xg])

                        sync()
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            first = timed(fn)
                        # re-packed on every call: the flatten failed, or cuDNN still warned now
                        flat = flatten_after_first_call(flat, caught)
                        repacked = flat["cudnn_flatten"] == "failed"
                        warm, spent, last = 1, 0.0, first
                        # at least one more warm-up (the first call carries cuDNN plan set-up)
                        while warm < 2 or (warm < args.warmup and spent + last < 250 * args.budget):
                            last = timed(fn)
                            spent += last
                            warm += 1
                        repeats = int(min(args.max_repeats, max(args.min_repeats, args.budget * 1e3 / max(last, 1e-3))))
                        times = sorted(timed(fn) for _ in range(repeats))
                        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
                        stats = dict(median_ms=statistics.median(times), iqr_ms=q3 - q1, q1_ms=q1, q3_ms=q3,
                                     min_ms=times[0], max_ms=times[-1], repeats=len(times), warmup=warm,
                                     first_ms=first, single_call=False, weights_repacked_per_call=repacked,
                                     **flat)
                        results.append({**base, **stats})
                        flatten_counts[flat["cudnn_flatten"]] = flatten_counts.get(flat["cudnn_flatten"], 0) + 1
                        m = stats["median_ms"]
                        d = 3 if m < 1 else 2 if m < 100 else 1
                        print(f"{dtype:8} {layer_name:5} {shape[0]:12} {mode:6} "
                              f"{m:>9.{d}f} ±{stats['iqr_ms']:<5.{d}f} {len(times):>4}"
                              f"{flatten_remark(flat)}", flush=True)
                        del layer, x, fn
                    except Exception as e:
                        msg = f"{type(e).__name__}: {e}"
                        print(f"{dtype:8} {layer_name:5} {shape[0]:12} {mode:6} FAILED {msg[:200]}", flush=True)
                        results.append({**base, "error": msg[:2000]})
                    write_json(args.json, meta, results)
                    if cuda:
                        torch.cuda.empty_cache()
    meta["complete"] = True
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    meta["cudnn_flatten_counts"] = flatten_counts
    write_json(args.json, meta, results)
    print(f"# cuDNN weight flattening: {flatten_summary(flatten_counts)}")
    print(f"# done in {meta['elapsed_s']} s" + (f"; results in {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
