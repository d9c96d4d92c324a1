"""Where a streaming step's time goes: host cost of ops, kernels and wrappers. (CUDA, CPU)

    python benchmarks/launch_cost_probe.py --json /tmp/cost.json

At (B, H) = (1, 640) times, as medians over rotating rounds: one elementwise op
evaluated, one custom kernel (the GRU forward step kernel) evaluated, the same
behind ``mx.custom_function``, and for stock's GRU step and the streaming
variants of ``ops/streaming.py`` the time to BUILD the graph (no eval) and to
build and evaluate it, forward and forward+backward. Build time is host-only
Python/C++ work; the rest of a call is evaluation (launches, and the GPU).
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

from mlx_fastrnn.cells import GRU_CELL
from mlx_fastrnn.kernels.launch import gpu_target
from mlx_fastrnn.ops import streaming


def _raw_kernel_cases(target, a, xp, hp, h3, bhn):
    """Calls of ``mx.fast`` kernel objects with prebuilt arguments (CUDA only):
    the GRU forward kernel, and a one-line kernel with and without a template."""
    if target != "cuda":
        return {}
    from mlx_fastrnn.cells.gru.kernels import FORWARD
    from mlx_fastrnn.kernels.launch import dims_array, fused_kernel

    gru_k = fused_kernel(FORWARD, "cuda")
    gru_kw = dict(inputs=[dims_array(1), xp, hp, h3, bhn], output_shapes=[(1, 1, a.shape[-1])],
                  output_dtypes=[mx.float32], grid=(a.shape[-1], 1, 1), threadgroup=(256, 1, 1),
                  template=[("T", mx.float32), ("TS", mx.float32), ("H", a.shape[-1])])
    body = "int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < N) { out[i] = inp[i] * 2.0f; }"
    plain = mx.fast.cuda_kernel(name="probe_plain", input_names=["inp"], output_names=["out"],
                                source=body.replace("N", str(a.size)))
    templ = mx.fast.cuda_kernel(name="probe_templ", input_names=["inp"], output_names=["out"], source=body)
    kw = dict(inputs=[a], output_shapes=[a.shape], output_dtypes=[mx.float32], grid=(a.size, 1, 1),
              threadgroup=(256, 1, 1))
    return {
        "gru kernel, raw call": lambda: gru_k(**gru_kw)[0],
        "1-line kernel": lambda: plain(**kw)[0],
        "1-line kernel + template": lambda: templ(**kw, template=[("N", a.size)])[0],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    H = args.hidden
    target = gpu_target() or "host:cuda"
    mx.random.seed(0)
    a = mx.random.normal((1, H))
    x = mx.random.normal((1, 1, H))
    h = 0.5 * mx.random.normal((1, H))
    gru = nn.GRU(H, H)
    xp = mx.random.normal((1, 1, 3 * H))
    hp = mx.random.normal((1, 1, 3 * H))
    h3 = mx.expand_dims(h, -2)
    bhn = gru.bhn
    mx.eval(a, x, h, xp, hp, h3, gru.parameters())
    op = streaming.cell_op(GRU_CELL, target)
    kernels = __import__(GRU_CELL.kernels, fromlist=["forward_step"])

    ident = mx.custom_function(lambda v: mx.tanh(v))

    @ident.vjp
    def _(p, c, o):
        return c

    def stock_fwd():
        return gru(x, h)

    def fused_fwd():  # the layers' GPU path (compiled; runs as written under a gradient)
        if target.startswith("host:"):  # the host harness can't run inside a compile trace
            return streaming._gru_fused(target, x, gru.Wx, gru.Wh, gru.b, gru.bhn, h)
        return streaming.gru_step(x, gru.Wx, gru.Wh, gru.b, gru.bhn, h)

    def fused_uncompiled_fwd():
        return streaming._gru_fused(target, x, gru.Wx, gru.Wh, gru.b, gru.bhn, h)

    def compiled_fwd():
        return streaming._gru_compiled(x, gru.Wx, gru.Wh, gru.b, gru.bhn, h)

    def grad_of(fn):
        def f(wx, wh, b, bhn, x):
            gru.Wx, gru.Wh, gru.b, gru.bhn = wx, wh, b, bhn
            return fn().mean()

        params = (gru.Wx, gru.Wh, gru.b, gru.bhn, x)
        vg = mx.value_and_grad(f, argnums=(0, 1, 2, 3, 4))
        return lambda: vg(*params)

    cases = {
        "tanh": lambda: mx.tanh(a),
        **_raw_kernel_cases(target, a, xp, hp, h3, bhn),
        "custom_function(tanh)": lambda: ident(a),
        "kernel": lambda: kernels.forward_step(xp, hp, (h3,), (bhn,), target=target)[0],
        "cell_op(kernel)": lambda: op(xp, hp, h3, bhn)[0],
        "stock fwd": stock_fwd,
        "compiled fwd": compiled_fwd,
        "fused fwd": fused_fwd,
        "fused uncompiled fwd": fused_uncompiled_fwd,
        "stock fwd+bwd": grad_of(stock_fwd),
        "compiled fwd+bwd": grad_of(compiled_fwd),
        "fused fwd+bwd": grad_of(fused_fwd),
    }
    names = list(cases)
    build = {k: [] for k in names}
    total = {k: [] for k in names}
    for k in names:  # warm up (kernel JIT, compile)
        for _ in range(10):
            mx.eval(cases[k]())
    for i in range(args.rounds):
        j = i % len(names)
        for k in names[j:] + names[:j]:
            t0 = time.perf_counter()
            out = cases[k]()
            t1 = time.perf_counter()
            mx.eval(out)
            t2 = time.perf_counter()
            build[k].append(t1 - t0)
            total[k].append(t2 - t0)
    results = []
    for k in names:
        b, t = statistics.median(build[k]) * 1e6, statistics.median(total[k]) * 1e6
        results.append({"case": k, "build_us": b, "total_us": t})
        print(f"{k:24} build {b:8.1f} us   build+eval {t:8.1f} us", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(mx.default_device()), "hidden": H, "target": target,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
