"""Does one compiled step beat stock's streaming step? (CUDA, CPU)

    python benchmarks/streaming_probe.py --json /tmp/stream.json

For GRU / LSTM / RNN at (B, L, H) = (1, 1, 640) with the state carried in
(a streaming step), times stock ``mlx.nn`` against the same math under
``mx.compile`` (the elementwise tail fused into one kernel: 2-3 matmuls + one
fused kernel instead of ~10-15 ops), forward and forward+backward, in
alternating rounds. Checks the results agree. GRU and LSTM use the layers'
own streaming step (``mlx_fastrnn/ops/streaming.py``); both sides load the
parameters into the layer on every call. (The 15:31 UTC H100 run of this
probe used its own copies of the math and did not reload on the compiled
side, so its forward+backward column is not comparable.)
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_fastrnn.ops import streaming


def rnn_step(x, h, wx, wh, b):
    # Not in mlx_fastrnn.ops.streaming: the layer runs stock's RNN step.
    return mx.expand_dims(mx.tanh(mx.addmm(b, x[:, 0], wx.T) + h @ wh.T), -2)


def cases(H, B):
    """{layer: (stock call, compiled call, layer)}; both calls take (params, x)
    and load the params into the layer first, so their gradient work matches."""
    mx.random.seed(0)
    x = mx.random.normal((B, 1, H))
    h = 0.5 * mx.random.normal((B, H))
    c = 0.5 * mx.random.normal((B, H))
    gru, lstm, rnn = nn.GRU(H, H), nn.LSTM(H, H), nn.RNN(H, H)
    compiled_rnn = mx.compile(rnn_step)
    return x, {
        "GRU": (lambda p, x: gru.update(p)(x, h),
                lambda p, x: streaming.gru_step(x, gru.update(p).Wx, gru.Wh, gru.b, gru.bhn, h), gru),
        "LSTM": (lambda p, x: lstm.update(p)(x, h, c),
                 lambda p, x: streaming.lstm_step(x, lstm.update(p).Wx, lstm.Wh, lstm.bias, h, c), lstm),
        "RNN": (lambda p, x: rnn.update(p)(x, h),
                lambda p, x: compiled_rnn(x, h, rnn.update(p).Wxh, rnn.Whh, rnn.bias), rnn),
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
    for name, (stock, compiled, layer) in cs.items():
        params = layer.trainable_parameters()
        mx.eval(params)
        runs = {}
        for impl, fn in (("stock", stock), ("compiled", compiled)):
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
        for mode in ("fwd", "fwdbwd"):
            a, b = runs["stock"][mode](), runs["compiled"][mode]()
            fa, fb = flat(a), flat(b)
            diff = (mx.abs(fa - fb).max() / mx.maximum(mx.abs(fa).max(), 1e-30)).item()
            times = {"stock": [], "compiled": []}
            for _ in range(20):
                runs["stock"][mode](); runs["compiled"][mode]()
            for i in range(args.rounds):
                order = ("stock", "compiled") if i % 2 == 0 else ("compiled", "stock")
                for impl in order:
                    t0 = time.perf_counter()
                    runs[impl][mode]()
                    times[impl].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rec = {"layer": name, "mode": mode, "stock_ms": med["stock"], "compiled_ms": med["compiled"],
                   "speedup": med["stock"] / med["compiled"], "rel_diff": diff}
            results.append(rec)
            print(f"{name:5} {mode:7} stock {med['stock']:.4f} ms  compiled {med['compiled']:.4f} ms  "
                  f"x{rec['speedup']:.2f}  rel diff {diff:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(mx.default_device()), "hidden": args.hidden, "batch": args.batch,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
