"""PyTorch baseline for pytorch_layers_bench.py: torch.nn.LSTM / GRU, stacked and bidirectional.

    python benchmarks/pytorch_layers_torch.py --json /tmp/ptl_torch.json            # cuDNN
    python benchmarks/pytorch_layers_torch.py --allow-cpu --dtype float32           # torch on the CPU (slow)
    python benchmarks/pytorch_layers_torch.py --shapes '32x40x200->200' --modes fwd --lengths with

Run it in its OWN process, never where MLX is imported (on the CUDA machine torch
and MLX's CUDA build clash on cuDNN; see torch_baseline.py), with PYTHONPATH not
pointing at MLX's site. This file imports no MLX; pytorch_layers_bench.py imports
the pure-Python configuration below from it (the cases, shapes and lengths are
shared, so both scripts time the same work).

Cases: ``torch.nn.<LSTM|GRU>(H_in, H, num_layers, bidirectional, batch_first=True)``
on ``x [B, L, H_in]``; ``fwd`` = forward under ``torch.no_grad()``, ``fwdbwd`` =
forward and backward of ``mean(output)`` w.r.t. all parameters and the input.
``--lengths with``: the seeded per-row lengths of :func:`seeded_lengths` through
``pack_padded_sequence(enforce_sorted=False)`` / ``pad_packed_sequence(total_length=L)``,
both inside the timed region (the user pays them). Direction rows (``kind:
directions``): one bidirectional layer against one one-direction layer.
Timing: CUDA events around each call plus a synchronize; median over repeats
adapted to --budget. After every dtype change ``bench_shapes.flatten_cudnn_weights``
puts the weights in one cuDNN buffer, bfloat16 included (torch's own
``flatten_parameters`` skips it), and verifies it; results record how in
``cudnn_flatten``, and those whose weights cuDNN still re-packs per call carry
``weights_repacked_per_call`` (as in torch_baseline.py). Exits 0 with a message
when torch or CUDA (without --allow-cpu) is missing.
"""

import argparse
import datetime
import os
import platform
import random
import socket
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shapes import (DTYPES, MODES, flatten_after_first_call, flatten_cudnn_weights,  # noqa: E402
                          open_torch, torch_timed_ms, write_json)

# ---------------------------------------------------------------------------
# configuration shared with pytorch_layers_bench.py (pure Python: no torch, no MLX)

LAYER_KINDS = ("LSTM", "GRU", "RNN")
DEFAULT_LAYER_KINDS = "LSTM,GRU"
LENGTH_CASES = ("without", "with")
GPU_SHAPES = ("16x1024x512->512", "32x40x200->200", "1x256x256->256")
CPU_SHAPES = ("1x256x512->256", "8x100x128->128")


def parse_shape(text):
    """'16x1024x512->512' (or '16x1024x512:512'; '16x1024x512' = hidden 512) ->
    dict(shape=name, batch, length, input, hidden)."""
    item = text.strip().lower().replace("->", ":")
    dims, _, hidden = item.partition(":")
    try:
        batch, length, input_size = (int(v) for v in dims.split("x"))
        hidden = int(hidden) if hidden else input_size
    except ValueError:
        raise SystemExit(f"bad shape {text!r}: use BxLxH_in->H, e.g. 16x1024x512->512") from None
    if min(batch, length, input_size, hidden) <= 0:
        raise SystemExit(f"bad shape {text!r}: every size must be > 0")
    return dict(shape=f"{batch}x{length}x{input_size}->{hidden}", batch=batch, length=length,
                input=input_size, hidden=hidden)


def pick_list(text, allowed, what):
    """'a,b' -> ['a', 'b'], case-insensitive against ``allowed``."""
    lookup = {str(a).lower(): a for a in allowed}
    out = []
    for item in str(text).split(","):
        if item.strip():
            if item.strip().lower() not in lookup:
                raise SystemExit(f"unknown {what} {item.strip()!r}; choose from: {', '.join(map(str, allowed))}")
            out.append(lookup[item.strip().lower()])
    return out


def seeded_lengths(batch, length, seed=0):
    """A fixed per-row length set in [ceil(L/2), L], row 0 at L (both scripts use these)."""
    rng = random.Random(seed * 1_000_003 + batch * 7919 + length)
    lengths = [rng.randint(max(1, (length + 1) // 2), length) for _ in range(batch)]
    lengths[0] = length
    return lengths


def add_common_args(p):
    p.add_argument("--layers", default=DEFAULT_LAYER_KINDS, help="comma-separated: LSTM,GRU,RNN (default LSTM,GRU)")
    p.add_argument("--num-layers", default="2", help="comma-separated stack depths (default 2)")
    p.add_argument("--directions", default="2", help="comma-separated: 1 and/or 2 (default 2 = bidirectional)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated BxLxH_in->H (quote the '>') or BxLxH_in:H; default: "
                        f"GPU {','.join(GPU_SHAPES)}; CPU {','.join(CPU_SHAPES)} (--full adds the GPU ones)")
    p.add_argument("--full", action="store_true", help="on the CPU also run the (slow) GPU shapes")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma-separated subset of fwd,fwdbwd")
    p.add_argument("--lengths", default="without,with", help="comma-separated: without (no lengths), with")
    p.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--no-direction-rows", action="store_true",
                   help="skip the one-bidirectional-layer vs one-one-direction-layer rows")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per config and impl")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--max-repeats", type=int, default=100)
    p.add_argument("--warmup", type=int, default=3, help="most warm-up calls (default 3)")
    p.add_argument("--json", default=None, metavar="PATH", help="write results here (after every config)")
    p.add_argument("--seed", type=int, default=0)


def build_configs(args, on_gpu):
    """Every config to run, in order: per (dtype, layer kind, shape) the stacked
    cases (``kind: stack``), then the direction rows (``kind: directions``)."""
    shapes = args.shapes.split(",") if args.shapes else (
        list(GPU_SHAPES) + (list(CPU_SHAPES) if args.full else []) if on_gpu
        else list(CPU_SHAPES) + (list(GPU_SHAPES) if args.full else []))
    shapes = [parse_shape(s) for s in shapes if s.strip()]
    depths = [int(v) for v in pick_list(args.num_layers, [str(i) for i in range(1, 65)], "num-layers")]
    directions = [int(v) for v in pick_list(args.directions, ["1", "2"], "directions")]
    modes = pick_list(args.modes, MODES, "mode")
    length_cases = pick_list(args.lengths, LENGTH_CASES, "lengths case")
    configs = []
    for dtype in pick_list(args.dtype, DTYPES, "dtype"):
        for layer in pick_list(args.layers, LAYER_KINDS, "layer"):
            for shape in shapes:
                for num_layers in depths:
                    for d in directions:
                        for lengths in length_cases:
                            for mode in modes:
                                configs.append(dict(kind="stack", layer=layer, **shape, num_layers=num_layers,
                                                    bidirectional=d == 2, mode=mode, dtype=dtype,
                                                    lengths=lengths == "with"))
                if not args.no_direction_rows:
                    for mode in modes:
                        configs.append(dict(kind="directions", layer=layer, **shape, num_layers=1,
                                            bidirectional=True, mode=mode, dtype=dtype, lengths=False))
    return configs


def config_label(cfg):
    if cfg["kind"] == "directions":
        return f"{cfg['dtype']} {cfg['layer']} 1 layer bi vs uni {cfg['shape']} {cfg['mode']}"
    return (f"{cfg['dtype']} {cfg['layer']} {cfg['num_layers']}L{'bi' if cfg['bidirectional'] else 'uni'} "
            f"{cfg['shape']} {cfg['mode']}{' lengths' if cfg['lengths'] else ''}")


def summarize(times_ms, **extra):
    ms = sorted(times_ms)
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    return dict(median_ms=statistics.median(ms), iqr_ms=q3 - q1, q1_ms=q1, q3_ms=q3, min_ms=ms[0],
                max_ms=ms[-1], repeats=len(ms), **extra)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


# ---------------------------------------------------------------------------
# the torch run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no CUDA (slow)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="set torch.backends.cudnn.benchmark")
    return p.parse_args(argv)


def make_torch_case(torch, cfg, device, dtype, seed, bidirectional=None):
    """-> (fn, flat): ``fn()`` runs the case once (packing/unpacking included);
    ``flat``: how its cuDNN weights were flattened (``bench_shapes.flatten_cudnn_weights``)."""
    torch.manual_seed(seed)
    bidirectional = cfg["bidirectional"] if bidirectional is None else bidirectional
    layer = getattr(torch.nn, cfg["layer"])(cfg["input"], cfg["hidden"], num_layers=cfg["num_layers"],
                                            bidirectional=bidirectional, batch_first=True)
    layer = layer.to(device=device, dtype=dtype)
    # after the dtype change: one cuDNN weight buffer, bfloat16 included (else re-packed per call)
    flat = flatten_cudnn_weights(torch, layer)
    length = cfg["length"]
    x = torch.randn(cfg["batch"], length, cfg["input"], device=device, dtype=dtype)
    lengths = (torch.tensor(seeded_lengths(cfg["batch"], length, seed), dtype=torch.int64)
               if cfg["lengths"] else None)  # pack_padded_sequence wants them on the CPU
    pack, unpack = torch.nn.utils.rnn.pack_padded_sequence, torch.nn.utils.rnn.pad_packed_sequence

    def forward(inp):
        if lengths is None:
            return layer(inp)
        out, state = layer(pack(inp, lengths, batch_first=True, enforce_sorted=False))
        return unpack(out, batch_first=True, total_length=length)[0], state

    if cfg["mode"] == "fwd":
        def fn():
            with torch.no_grad():
                return forward(x)
    else:
        xg = x.clone().requires_grad_(True)
        params = list(layer.parameters())

        def fn():
            out, _ = forward(xg)
            return torch.autograd.grad(out.float().mean(), params + [xg])
    return fn, flat


def main(argv=None):
    if "mlx" in sys.modules or "mlx.core" in sys.modules:
        sys.exit("pytorch_layers_torch.py must run in a process without MLX")
    args = parse_args(argv)
    opened = open_torch("pytorch_layers_torch", args.allow_cpu, args.cudnn_benchmark)
    if opened is None:
        return 0
    torch, device = opened
    cuda = device.type == "cuda"
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    configs = build_configs(args, on_gpu=cuda)
    impl = "cudnn" if cuda else "torch-cpu"
    meta = {
        "tool": "pytorch_layers_torch",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "impl": impl, "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "cudnn_benchmark": bool(args.cudnn_benchmark), "device": str(device),
        "device_type": "gpu" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else cpu_model(),
        "torch_threads": torch.get_num_threads(), "budget_s": args.budget, "seed": args.seed,
        "machine": {"uname": " ".join(platform.uname()), "hostname": socket.gethostname(),
                    "nproc": os.cpu_count(), "python": sys.version.split()[0]},
        "configs": len(configs), "complete": False,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    results = []
    write_json(args.json, meta, results)
    print(f"# pytorch_layers_torch: {meta['device_name']}, torch {torch.__version__}, cuDNN "
          f"{meta['cudnn_version']}, {meta['date']}; {len(configs)} configs; median ms ±IQR", flush=True)

    def timed(fn):
        return torch_timed_ms(torch, fn, cuda)

    def measure(fn, flat):
        if cuda:
            torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = timed(fn)
        # re-packed on every call: the flatten failed, or cuDNN still warned now
        flat = flatten_after_first_call(flat, caught)
        repacked = flat["cudnn_flatten"] == "failed"
        warm, spent, last = 1, 0.0, first
        while warm < 2 or (warm < args.warmup and spent + last < 250 * args.budget):
            last = timed(fn)
            spent += last
            warm += 1
        repeats = int(min(args.max_repeats, max(args.min_repeats, args.budget * 1e3 / max(last, 1e-3))))
        return summarize([timed(fn) for _ in range(repeats)], warmup=warm, first_ms=first,
                         single_call=False, weights_repacked_per_call=repacked, **flat)

    if cuda:  # initialise CUDA, cuBLAS and cuDNN outside the first timed config
        warm_layer = torch.nn.LSTM(8, 8, batch_first=True, bidirectional=True).to(device)
        warm_layer(torch.randn(2, 3, 8, device=device))[0].sum().backward()
        torch.cuda.synchronize()
        del warm_layer

    t_start = time.perf_counter()
    for i, cfg in enumerate(configs, 1):
        label = config_label(cfg)
        print(f"# [{i}/{len(configs)}, {time.perf_counter() - t_start:.1f} s] {label}", flush=True)
        variants = [True, False] if cfg["kind"] == "directions" else [cfg["bidirectional"]]
        got = {}
        for bidirectional in variants:
            base = {**cfg, "bidirectional": bidirectional, "impl": impl,
                    "lengths_values": seeded_lengths(cfg["batch"], cfg["length"], args.seed)
                    if cfg["lengths"] else None}
            try:
                fn, flat = make_torch_case(torch, cfg, device, tdt[cfg["dtype"]], args.seed, bidirectional)
                got[bidirectional] = rec = {**base, **measure(fn, flat)}
                del fn
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                print(f"#   FAILED {msg[:300]}", flush=True)
                rec = {**base, "error": msg[:2000]}
            results.append(rec)
            if cuda:
                torch.cuda.empty_cache()
        line = "  ".join(f"{'bi' if b else 'uni'} {r['median_ms']:.3f} ±{r['iqr_ms']:.3f} ms (n {r['repeats']})"
                         + (" (weights re-packed every call)" if r["weights_repacked_per_call"] else "")
                         for b, r in got.items())
        if cfg["kind"] == "directions" and len(got) == 2:
            got[True]["bidir_vs_one_direction"] = ratio = got[True]["median_ms"] / got[False]["median_ms"]
            line += f"  bi/uni {ratio:.2f}x"
        print(f"{label}: {line}", flush=True)
        write_json(args.json, meta, results)
    meta["complete"] = True
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None  # other work on the machine
    write_json(args.json, meta, results)
    print(f"# done in {meta['elapsed_s']} s" + (f"; results in {args.json}" if args.json else ""))
    return 0 if not any("error" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
