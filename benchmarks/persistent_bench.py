"""Persistent (whole-sequence) kernels vs the per-step path, on MLX's CUDA backend.

    python benchmarks/persistent_bench.py
    python benchmarks/persistent_bench.py --cells gru,lstm --dtypes float32,bfloat16 \
        --shapes 32x40x200,64x256x256,16x1024x512 --json /tmp/persistent.json

Each case is one recurrence (no input projection) on ``xp`` [L, B, G*H], the
initial state not given (zeros), as a layer called without ``hidden`` runs it:

- ``fwd``: the state sequences (and hp), evaluated.
- ``fwdbwd``: forward, then the cotangents of ``xp`` and ``W_h`` for random
  output cotangents: per-step = ``mx.vjp`` through ``ops.sequence.recurrence``
  (the driver's fused backward), persistent = ``persistent_sequence`` +
  ``persistent_backward`` + the driver's one-matmul ``dW_h``.

The per-step path is ``ops.recurrent.default_steps`` (the fused per-step CUDA
kernels when importable, else the compiled reference step). Times are medians
of ``--repeats`` calls (after ``--warmup``), each ending in ``mx.eval``.
``rel.diff`` = max |persistent - per-step| / max(1, max |per-step|) over all
results. ``plan`` = U/NU/BB/NBB/KS/smem of the chosen split (``-`` = declined:
the per-step path runs).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import mlx.core as mx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mlx_fastrnn.cells import GRU_CELL, LSTM_CELL, RNN_RELU_CELL, RNN_TANH_CELL  # noqa: E402
from mlx_fastrnn.kernels import persistent as P  # noqa: E402
from mlx_fastrnn.ops.recurrent import default_steps  # noqa: E402
from mlx_fastrnn.ops.sequence import recurrence  # noqa: E402

CELLS = {"gru": GRU_CELL, "lstm": LSTM_CELL, "rnn_tanh": RNN_TANH_CELL, "rnn_relu": RNN_RELU_CELL}
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
DEFAULT_SHAPES = "32x40x200,64x256x256,16x1024x512"


def make_problem(cell_name, B, L, H, dtype, seed=0, heads=1):
    """Pre-activations, W_h, zero states, parameters and output cotangents of one problem,
    or of ``heads`` independent ones (B rows each, stacked head-major; W_h [heads, G*H, H])."""
    cell = CELLS[cell_name]
    G = P.CELLS[cell_name].num_gates
    ks = mx.random.split(mx.random.key(seed), 6)
    rows = heads * B
    lead = (heads,) if heads > 1 else ()
    xp = mx.random.normal((L, rows, G * H), key=ks[0]).astype(dtype)
    w_h = mx.random.uniform(-1, 1, (*lead, G * H, H), key=ks[1]) / (H ** 0.5)
    states0 = tuple(mx.zeros((rows, H)) for _ in range(cell.num_states))
    params = (mx.random.normal((*lead, H), key=ks[2]) * 0.1,) if cell_name == "gru" else ()
    cots = tuple(mx.random.normal((L, rows, H), key=ks[3 + i]) for i in range(cell.num_states))
    mx.eval(xp, w_h, states0, params, cots)
    return xp, w_h, states0, params, cots


def per_step_fns(cell_name, xp, w_h, states0, params, cots):
    cell = CELLS[cell_name]
    steps = default_steps(cell, whole_sequence=False)
    given = (False,) * cell.num_states

    def fwd():
        return recurrence(cell, steps, xp, w_h, states0, params, given)

    def fwdbwd():
        def f(xp_, w_):
            return recurrence(cell, steps, xp_, w_, states0, params, given)

        outs, (dx, dw) = mx.vjp(f, [xp, w_h], list(cots))
        return (*outs, dx, dw)

    return fwd, fwdbwd, steps.name


def persistent_fns(cell_name, xp, w_h, states0, params, cots):
    """As the layers run them without initial states: no state arrays (``ZS``), the
    backward shifting each state's own sequence (:mod:`mlx_fastrnn.kernels.contract`)."""
    n = CELLS[cell_name].num_states
    none = (None,) * n

    def fwd():
        out = P.persistent_sequence(cell_name, xp, w_h, none, params, True)
        return out[:n]

    def fwdbwd():
        out = P.persistent_sequence(cell_name, xp, w_h, none, params, True)
        seqs, hp = out[:n], out[n]
        dx, dhp, _ = P.persistent_backward(cell_name, cots, xp, hp, seqs, params, w_h, False,
                                           zero_states=(1 << n) - 1)
        L, B, GH = dhp.shape
        H = w_h.shape[1]
        if L > 1:  # the driver's dW_h: one matmul, the zero first state left out
            dw = dhp[1:].reshape(-1, GH).T @ seqs[0][:-1].reshape(-1, H)
        else:
            dw = mx.zeros_like(w_h)
        return (*seqs, dx.astype(xp.dtype), dw)

    return fwd, fwdbwd


def timeit(fn, warmup, repeats):
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def rel_diff(a_list, b_list):
    worst = 0.0
    for a, b in zip(a_list, b_list):
        a32, b32 = a.astype(mx.float32), b.astype(mx.float32)
        d = mx.abs(a32 - b32).max().item() / max(1.0, mx.abs(b32).max().item())
        worst = max(worst, d)
    return worst


def plan_text(p):
    if p is None:
        return "-"
    return (f"U{p.U} NU{p.NU} BB{p.BB}x{p.NBB} RB{p.RB}/{p.NCS} KS{p.KS} {p.smem // 1024}K"
            f"{' W16' if p.w_half and not getattr(p, 'mma', 0) else ''}{' WG' if p.w_global else ''}"
            f"{' MMA-' + {1: 'bf16', 2: 'f16', 3: 'tf32'}[p.mma] if getattr(p, 'mma', 0) else ''}"
            f"{f' CL{p.CL}' if getattr(p, 'CL', 0) else ''}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="gru,lstm")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="BxLxH,...")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None, help="write the results here (rewritten after every case)")
    args = ap.parse_args(argv)

    if not P.cuda_available():
        raise SystemExit("persistent_bench: needs MLX's CUDA backend (mx.cuda.is_available() and a GPU default device)")
    limits = P.device_limits()
    meta = {
        "host": platform.node(),
        "mlx": mx.__version__,
        "device": {k: str(v) for k, v in mx.device_info().items()},
        "limits": None if limits is None else limits.__dict__,
        "smem_budget": None if limits is None else P.smem_budget(limits),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    results = []

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)

    header = f"{'cell':8} {'dtype':8} {'shape BxLxH':14} {'mode':7} {'per-step ms':>11} {'persist ms':>10} {'speedup':>7} {'rel.diff':>9}  plan"
    print(header)
    print("-" * len(header))
    for cell_name in args.cells.split(","):
        for dname in args.dtypes.split(","):
            for shape in args.shapes.split(","):
                B, L, H = (int(v) for v in shape.lower().split("x"))
                prob = make_problem(cell_name, B, L, H, DTYPES[dname])
                xp, w_h = prob[0], prob[1]
                ps_fwd, ps_fwdbwd, steps_name = per_step_fns(cell_name, *prob)
                pe_fwd, pe_fwdbwd = persistent_fns(cell_name, *prob)
                for mode in args.modes.split(","):
                    direction = "forward" if mode == "fwd" else "backward"
                    plan = P.select(direction, cell_name, xp, w_h)
                    fplan = P.select("forward", cell_name, xp, w_h)
                    rec = {"cell": cell_name, "dtype": dname, "B": B, "L": L, "H": H, "mode": mode,
                           "per_step": steps_name, "plan_forward": plan_text(fplan),
                           "plan": plan_text(plan)}
                    ps, pe = (ps_fwd, pe_fwd) if mode == "fwd" else (ps_fwdbwd, pe_fwdbwd)
                    try:
                        rec["per_step_ms"] = timeit(ps, args.warmup, args.repeats)
                    except Exception as e:  # noqa: BLE001
                        rec["per_step_error"] = repr(e)
                    if fplan is not None and plan is not None:
                        try:
                            rec["persistent_ms"] = timeit(pe, args.warmup, args.repeats)
                            rec["rel_diff"] = rel_diff(pe(), ps())
                        except Exception as e:  # noqa: BLE001
                            rec["persistent_error"] = repr(e)
                    results.append(rec)
                    dump()
                    a, b = rec.get("per_step_ms"), rec.get("persistent_ms")
                    speed = f"{a / b:7.2f}" if a and b else "      -"
                    fa = f"{a:11.3f}" if a else f"{'err' if 'per_step_error' in rec else '-':>11}"
                    fb = f"{b:10.3f}" if b else f"{'err' if 'persistent_error' in rec else '-':>10}"
                    rd = f"{rec['rel_diff']:9.1e}" if "rel_diff" in rec else f"{'-':>9}"
                    print(f"{cell_name:8} {dname:8} {shape:14} {mode:7} {fa} {fb} {speed} {rd}  {rec['plan']}",
                          flush=True)
                    for k in ("per_step_error", "persistent_error"):
                        if k in rec:
                            print(f"    {k}: {rec[k][:300]}")
    dump()


if __name__ == "__main__":
    main()
