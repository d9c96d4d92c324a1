"""Where a persistent step's time goes, and which split is fastest (CUDA only).

    python benchmarks/persistent_tune.py --json /tmp/tune.json
    python benchmarks/persistent_tune.py --cells gru --shapes 16x1024x512 --parts diag

For each (cell, shape) and direction (forward kernel alone; backward kernel
alone, on the forward's saved tensors):

* ``diag``: the selected plan under the ``FRNN_*`` switches of
  ``kernels/persistent_header.py``: the current code; each of its choices
  undone (fence barrier, one k per lane in the projection, ldcg staging, one
  warp sum per value) and the default before cp.async and the butterfly
  reduction (``previous``); each checked against the current code (max abs
  difference); timing-only variants with the barrier, the
  projection or the staging left out (their results are wrong by design; only
  the difference in time is meaningful), and all three left out (the floor:
  launch, W_h load, cell math and stores).
* ``layer`` (forward only): the whole fast layer call (``mlx_fastrnn.GRU`` etc.
  on a batch-first input), the same with the persistent kernels off (per-step
  cells), the kernel alone and the input projection alone, to see what the
  layer adds around the kernel (``--layer-repeats`` calls each).
* ``plans``: other splits of the same problem (batch groups ``nbb``, a cap on
  the blocks, threads per block, column splits of the projection's warp tasks on
  and off), each checked against the selected plan's
  results (max abs difference) and with the planner's model cost, to calibrate
  ``plan``.

Times: median ms of ``--repeats`` calls after ``--warmup`` (the first call of a
variant compiles it and is not timed); ``us/step`` = ms * 1000 / L.
"""

import argparse
import json
import os
import platform
import sys
import time

import mlx.core as mx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

from mlx_fastrnn.kernels import persistent as P  # noqa: E402
from mlx_fastrnn.kernels.persistent_header import HEADER  # noqa: E402
from persistent_bench import make_problem, plan_text, timeit  # noqa: E402

DIAG = {
    "current": (),
    # the MLX_FASTRNN_PERSISTENT_SWITCHES variants, under the same names
    **{name: (macro,) for name, macro in P.SWITCHES.items()},
    # the default kernel before cp.async staging and the butterfly reduction
    "previous": (P.SWITCHES["ldcg_staging"], P.SWITCHES["per_value_reduction"]),
    "no_barrier": ("FRNN_DIAG_NO_BARRIER",),
    "no_projection": ("FRNN_DIAG_NO_MATVEC",),
    "no_staging": ("FRNN_DIAG_NO_STAGE",),
    "floor": ("FRNN_DIAG_NO_BARRIER", "FRNN_DIAG_NO_MATVEC", "FRNN_DIAG_NO_STAGE"),
}


def header_with(macros):
    return P.defines(macros) + HEADER


def max_abs_diff(a, b):
    return max(mx.abs(x.astype(mx.float32) - y.astype(mx.float32)).max().item()
               for x, y in zip(a, b) if x is not None)


class Problem:
    def __init__(self, cell, B, L, H, dtype, heads=1):
        self.cell, self.B, self.L, self.H = cell, B, L, H
        self.xp, self.w_h, self.states0, self.params, self.cots = make_problem(cell, B, L, H, dtype, heads=heads)
        n = P.CELLS[cell].num_states
        out = P.persistent_sequence(cell, self.xp, self.w_h, self.states0, self.params, True)
        if out is None:
            raise RuntimeError("declined")
        mx.eval(out)
        self.seqs, self.hp = out[:n], out[n]
        self.prevs = tuple(mx.concatenate([s0[None], s[:-1]], axis=0) for s0, s in zip(self.states0, self.seqs))
        mx.eval(self.prevs)

    def fn(self, direction, plan=None, header=HEADER, tpb=256):
        if direction == "forward":
            return lambda: P.persistent_sequence(self.cell, self.xp, self.w_h, self.states0, self.params, True,
                                                 use_plan=plan, header=header, tpb=tpb)
        return lambda: P.persistent_backward(self.cell, self.cots, self.xp, self.hp, self.prevs, self.params,
                                             self.w_h, False, use_plan=plan, header=header, tpb=tpb)


def candidate_plans(direction, cell, H, B, limits, x_dtype):
    """Distinct feasible splits: batch groups x block caps x threads per block x the
    projection's warp tasks with and without column splits (``Plan.NCS``), on CUDA
    cores and on tensor cores (``Plan.mma``, where the dtype and MLX_ENABLE_TF32 allow)."""
    out = {}
    saved = os.environ.get("MLX_FASTRNN_PERSISTENT_COLSPLIT")
    try:
        for colsplit in ("1", "0"):
            os.environ["MLX_FASTRNN_PERSISTENT_COLSPLIT"] = colsplit
            for tpb in (128, 256, 512):
                for cap in (limits.num_sms, 96, 64, 32, 16):
                    capped = P.Limits(**{**limits.__dict__, "num_sms": cap})
                    nbb = 1
                    while nbb <= min(B, cap):
                        for weights, mma in (("auto", 0), ("mma", None)):
                            p = P.plan(direction, cell, H, B, capped, x_dtype=x_dtype, tpb=tpb, nbb=nbb,
                                       weights=weights, mma=mma)
                            if p is not None:
                                out.setdefault((p.U, p.NU, p.BB, p.NBB, p.RB, p.NCS, p.KS, p.KCH, p.TPB, p.w_half,
                                                p.mma, p.CL), p)
                        nbb *= 2
    finally:
        if saved is None:
            os.environ.pop("MLX_FASTRNN_PERSISTENT_COLSPLIT", None)
        else:
            os.environ["MLX_FASTRNN_PERSISTENT_COLSPLIT"] = saved
    return list(out.values())


def layer_fns(cell, B, L, H, dtype, prob):
    """(name, fn) pairs: the fast layer call, the same on the per-step cells
    (``MLX_RNN_IMPL=cell``), its kernel alone, its input projection alone."""
    import mlx_fastrnn

    layer = {"gru": mlx_fastrnn.GRU, "lstm": mlx_fastrnn.LSTM}.get(cell, mlx_fastrnn.RNN)(H, H)
    layer.set_dtype(dtype)
    x = mx.random.normal((B, L, H)).astype(dtype)
    mx.eval(layer.parameters(), x)
    w_x = layer.Wxh if cell.startswith("rnn") else layer.Wx

    def per_step_cells():
        with mlx_fastrnn.use_impl("cell"):
            return layer(x)

    return [("layer call", lambda: layer(x)), ("layer call, per-step cells", per_step_cells),
            ("kernel alone", prob.fn("forward")), ("input projection alone", lambda: x.reshape(-1, H) @ w_x.T)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="gru,lstm")
    ap.add_argument("--shapes", default="64x256x256,16x1024x512")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--heads", type=int, default=1,
                    help="independent problems of B x H each in one launch (a multi-head layer's heads; "
                         "diag only: the layer and plans parts are skipped)")
    ap.add_argument("--directions", default="forward,backward")
    ap.add_argument("--parts", default="diag,plans")
    ap.add_argument("--variants", default=",".join(DIAG), help="diag variants to run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layer-repeats", type=int, default=200, help="repeats of each 'layer' part timing")
    ap.add_argument("--max-plans", type=int, default=10, help="most alternative splits per case (cheapest model cost first)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not P.cuda_available():
        raise SystemExit("persistent_tune: needs MLX's CUDA backend")
    limits = P.device_limits()
    dtype = getattr(mx, args.dtype)
    meta = {"host": platform.node(), "mlx": mx.__version__, "limits": limits.__dict__,
            "smem_budget": P.smem_budget(limits), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "dtype": args.dtype}
    results = []

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)

    def record(rec):
        results.append(rec)
        dump()
        ms = rec.get("ms")
        us = f"{ms * 1000 / rec['L']:8.2f}" if ms else "       -"
        diff = f"{rec['max_abs_diff']:.1e}" if "max_abs_diff" in rec else "-"
        print(f"{rec['cell']:5} {rec['shape']:12} {rec['direction'][:3]} {rec['part']:5} {rec['variant']:40} "
              f"{(f'{ms:9.3f}' if ms else '      err')} {us}  cost {rec.get('cost', 0):8.0f}  diff {diff}"
              + (f"  {rec['error'][:200]}" if "error" in rec else ""), flush=True)

    print(f"{'cell':5} {'shape':12} dir part  {'variant':40} {'ms':>9} {'us/step':>8}")
    for cell in args.cells.split(","):
        for shape in args.shapes.split(","):
            B, L, H = (int(v) for v in shape.split("x"))
            prob = Problem(cell, B, L, H, dtype, args.heads)
            for direction in args.directions.split(","):
                base_plan = P.select(direction, cell, prob.xp, prob.w_h)
                ref = prob.fn(direction)()
                mx.eval(ref)
                common = {"cell": cell, "shape": shape, "B": B, "L": L, "H": H, "heads": args.heads,
                          "direction": direction}
                if "diag" in args.parts:
                    for name in args.variants.split(","):
                        defines = DIAG[name]
                        rec = {**common, "part": "diag", "variant": name, "plan": plan_text(base_plan),
                               "cost": base_plan.cost}
                        try:
                            fn = prob.fn(direction, base_plan, header_with(defines))
                            rec["ms"] = timeit(fn, args.warmup, args.repeats)
                            if not any(d.startswith("FRNN_DIAG_") for d in defines):
                                rec["max_abs_diff"] = max_abs_diff(fn(), ref)
                        except Exception as e:  # noqa: BLE001
                            rec["error"] = repr(e)
                        record(rec)
                if "layer" in args.parts and direction == "forward" and args.heads == 1:
                    for name, fn in layer_fns(cell, B, L, H, dtype, prob):
                        rec = {**common, "part": "layer", "variant": name, "plan": plan_text(base_plan)}
                        try:
                            rec["ms"] = timeit(fn, args.warmup, args.layer_repeats)
                        except Exception as e:  # noqa: BLE001
                            rec["error"] = repr(e)
                        record(rec)
                if "plans" in args.parts and args.heads == 1:
                    cands = sorted(candidate_plans(direction, cell, H, B, limits, dtype), key=lambda p: p.cost)
                    for p in cands[: args.max_plans]:
                        for hname in ("current", "fence_barrier"):
                            rec = {**common, "part": "plans",
                                   "variant": f"{plan_text(p)} T{p.TPB} {hname}", "plan": plan_text(p),
                                   "tpb": p.TPB, "nbb": p.NBB, "cost": p.cost, "header": hname,
                                   "selected": p == base_plan}
                            try:
                                fn = prob.fn(direction, p, header_with(DIAG[hname]), tpb=p.TPB)
                                rec["ms"] = timeit(fn, args.warmup, args.repeats)
                                rec["max_abs_diff"] = max_abs_diff(fn(), ref)
                            except Exception as e:  # noqa: BLE001
                                rec["error"] = repr(e)
                            record(rec)
    dump()


if __name__ == "__main__":
    main()
