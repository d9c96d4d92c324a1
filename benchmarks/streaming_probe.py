"""Which streaming step is quickest? (CUDA, CPU)

    python benchmarks/streaming_probe.py --json /tmp/stream.json

For GRU / LSTM / RNN at (B, 1, H) (default (1, 1, 640), the state carried in:
a streaming step), times stock ``mlx.nn`` against the variants of
``mlx_fastrnn/ops/streaming.py``, forward and forward+backward, in rotating
rounds (each round runs every variant once, the order shifted by one each
round), and checks the results agree with stock's:

- ``compiled``: stock's math for one step under ``mx.compile`` (the CPU path);
- ``fused``: the GPU path (two matmuls + the cell's fused kernel, fused
  backward kernel); on the CPU the layers' entry runs ``compiled`` instead;
- RNN ``lean``: stock's ops without the slice and the stack (the layers' path).

Every variant loads the parameters into the layer on each call, as stock's
does, so their gradient work matches.
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_fastrnn.ops import streaming


def cases(H, B):
    """{layer: ({variant: call(params, x)}, layer)}."""
    mx.random.seed(0)
    x = mx.random.normal((B, 1, H))
    h = 0.5 * mx.random.normal((B, H))
    c = 0.5 * mx.random.normal((B, H))
    gru, lstm, rnn = nn.GRU(H, H), nn.LSTM(H, H), nn.RNN(H, H)
    return x, {
        "GRU": ({
            "stock": lambda p, x: gru.update(p)(x, h),
            "compiled": lambda p, x: streaming._gru_compiled(x, gru.update(p).Wx, gru.Wh, gru.b, gru.bhn, h),
            "fused": lambda p, x: streaming.gru_step(x, gru.update(p).Wx, gru.Wh, gru.b, gru.bhn, h),
        }, gru),
        "LSTM": ({
            "stock": lambda p, x: lstm.update(p)(x, h, c),
            "compiled": lambda p, x: streaming._lstm_compiled(x, lstm.update(p).Wx, lstm.Wh, lstm.bias, h, c),
            "fused": lambda p, x: streaming.lstm_step(x, lstm.update(p).Wx, lstm.Wh, lstm.bias, h, c),
        }, lstm),
        "RNN": ({
            "stock": lambda p, x: rnn.update(p)(x, h),
            "lean": lambda p, x: streaming.rnn_step(x, rnn.update(p).Wxh, rnn.Whh, rnn.bias, h, rnn.nonlinearity),
        }, rnn),
    }


def flat(tree):
    return mx.concatenate([v.reshape(-1).astype(mx.float32) for _, v in tree_flatten(tree)])


def first(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    x, cs = cases(args.hidden, args.batch)
    results = []
    for name, (variants, layer) in cs.items():
        params = layer.trainable_parameters()
        mx.eval(params)
        runs = {}
        for impl, fn in variants.items():
            def fwd(fn=fn):
                o = fn(params, x)
                mx.eval(o)
                return o

            vg = mx.value_and_grad(lambda p, x, fn=fn: first(fn(p, x)).mean(), argnums=(0, 1))

            def fwdbwd(vg=vg):
                o = vg(params, x)
                mx.eval(o)
                return o

            runs[impl] = {"fwd": fwd, "fwdbwd": fwdbwd}
        names = list(runs)
        for mode in ("fwd", "fwdbwd"):
            ref = flat(runs["stock"][mode]())
            diffs = {}
            for impl in names[1:]:
                got = flat(runs[impl][mode]())
                diffs[impl] = (mx.abs(got - ref).max() / mx.maximum(mx.abs(ref).max(), 1e-30)).item()
            times = {k: [] for k in names}
            for _ in range(20):
                for impl in names:
                    runs[impl][mode]()
            for i in range(args.rounds):
                k = i % len(names)
                for impl in names[k:] + names[:k]:
                    t0 = time.perf_counter()
                    runs[impl][mode]()
                    times[impl].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            for impl in names[1:]:
                rec = {"layer": name, "mode": mode, "variant": impl, "stock_ms": med["stock"],
                       "variant_ms": med[impl], "speedup": med["stock"] / med[impl], "rel_diff": diffs[impl]}
                results.append(rec)
                print(f"{name:5} {mode:7} {impl:9} stock {med['stock']:.4f} ms  {impl} {med[impl]:.4f} ms  "
                      f"x{rec['speedup']:.2f}  rel diff {diffs[impl]:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(mx.default_device()), "hidden": args.hidden, "batch": args.batch,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
