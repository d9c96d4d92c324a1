"""The tiled class's tensor-core projection (``Plan.mma``) on a real GPU.

Parity of outputs and gradients with the reference loop on the CPU stream whose
projection rounds its operands as the plan does (``ref.forward(..., mma=)``): what
is left is float32 accumulation order and, now and then, an operand the kernel
rounds to the other side of a rounding boundary (its state differs from the
reference's in the last float32 bits), one MMA-type ulp of one product. A wrong
fragment, tile or padding is off by O(1). Skipped unless MLX's CUDA backend is
available.
"""

import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

import persistent_reference as ref
from mlx_fastrnn.kernels import gpu
from mlx_fastrnn.kernels import persistent as P

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ref.cuda_available(), reason="needs MLX's CUDA backend"),
]

KIND = {mx.bfloat16: gpu.MMA_BF16, mx.float16: gpu.MMA_F16, mx.float32: gpu.MMA_TF32}
TOL = {gpu.MMA_BF16: 3e-3, gpu.MMA_F16: 1e-3, gpu.MMA_TF32: 1e-3}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for k in ("MLX_FASTRNN_PERSISTENT", "MLX_FASTRNN_PERSISTENT_SMEM", "MLX_FASTRNN_PERSISTENT_BLOCKS",
              "MLX_FASTRNN_PERSISTENT_SWITCHES", "MLX_FASTRNN_PERSISTENT_MMA", "MLX_FASTRNN_PERSISTENT_MMA_FIT",
              "MLX_FASTRNN_PERSISTENT_PIPELINE", "MLX_FASTRNN_PERSISTENT_STREAMED",
              "MLX_FASTRNN_PERSISTENT_HALF_ROWS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLX_ENABLE_TF32", "1")  # our planner reads it per call (MLX's own matmuls: once)


def _stacked(cell, L, B, H, xdt, problems):
    parts, (xp, w, s0, params) = ref.stacked_problems(cell, problems, L, B, H, xdt, False)
    mx.eval(xp, w, s0, params)
    return xp, w, s0, params


@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("xdt", [mx.float32, mx.bfloat16, mx.float16], ids=["tf32", "bf16", "f16"])
@pytest.mark.parametrize("L,B,H,problems", [(9, 20, 96, 1), (6, 64, 64, 4), (5, 3, 200, 1)])
def test_mma_parity(cell, xdt, L, B, H, problems):
    _check_parity(cell, xdt, L, B, H, problems, "mma")


@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("xdt", [mx.float32, mx.bfloat16, mx.float16], ids=["tf32", "bf16", "f16"])
@pytest.mark.parametrize("L,B,H,problems", [(9, 20, 96, 1), (6, 16, 64, 2), (4, 8, 1024, 1)])
def test_streamed_mma_parity(cell, xdt, L, B, H, problems):
    """W_h streamed, each K-chunk of the block's rows staged for the tensor cores."""
    _check_parity(cell, xdt, L, B, H, problems, "mma_global")


# the opt-in forms of the tensor-core projection: (switch, the plan field it sets, dtypes)
FORMS = [("MLX_FASTRNN_PERSISTENT_PIPELINE", "pipe", (mx.float32, mx.bfloat16)),
         ("MLX_FASTRNN_PERSISTENT_HALF_ROWS", "hrows", (mx.bfloat16, mx.float16))]


@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("form,xdt", [(f, x) for f, _, xs in FORMS for x in xs],
                         ids=lambda v: v if isinstance(v, str) else str(v).split(".")[-1])
@pytest.mark.parametrize("L,B,H,problems,weights", [(4, 8, 1024, 1, "mma_global"), (5, 64, 256, 4, "mma"),
                                                    (3, 128, 1024, 1, "mma_global")])
def test_opt_in_mma_form_parity(cell, form, xdt, L, B, H, problems, weights, monkeypatch):
    """``MLX_FASTRNN_PERSISTENT_PIPELINE=1`` (the next K-chunk staged while this one's MMAs
    run) and ``MLX_FASTRNN_PERSISTENT_HALF_ROWS=1`` (the staged rows as the MMA's 16-bit type)."""
    field = dict((f, a) for f, a, _ in FORMS)[form]
    monkeypatch.setenv(form, "1")
    xp, w, s0, params = _stacked(cell, L, B, H, xdt, problems)
    plans = [P.select(d, cell, xp, w, weights=weights) for d in ("forward", "backward")]
    if not any(p is not None and getattr(p, field) for p in plans):
        pytest.skip(f"no plan with {field} for this shape")
    got = _check_parity(cell, xdt, L, B, H, problems, weights)
    if field == "hrows":
        # the 16-bit staged rows round each value once, as the fragment loads did at every
        # k-step: the same numbers as the float32-staged plan, bit for bit
        monkeypatch.delenv(form)
        plain = _check_parity(cell, xdt, L, B, H, problems, weights)
        got, plain = tree_flatten(got), tree_flatten(plain)
        assert len(got) == len(plain) > 0
        for a, b in zip(got, plain):
            assert mx.array_equal(a[1], b[1]).item(), f"{a[0]} differs with {form} on and off"


def _check_parity(cell, xdt, L, B, H, problems, weights):
    kind = KIND[xdt]
    xp, w, s0, params = _stacked(cell, L, B, H, xdt, problems)
    pf = P.select("forward", cell, xp, w, weights=weights)
    # float16: the backward keeps the FMA projection (its cotangents would underflow)
    pb = P.select("backward", cell, xp, w, weights=("global" if weights == "mma_global" else "auto")
                  if kind == gpu.MMA_F16 else weights)
    if pf is None or pb is None:
        pytest.skip("no tensor-core plan fits")
    assert pf.mma == kind and pb.mma == (0 if kind == gpu.MMA_F16 else kind)
    assert pf.w_global == (weights == "mma_global") and pb.w_global == pf.w_global
    got = P.persistent_sequence(cell, xp, w, s0, params, False, use_plan=pf)
    mx.eval(got)
    rows = xp.shape[1] // problems
    for k in range(problems):
        sl = slice(k * rows, (k + 1) * rows)
        wk = w if problems == 1 else w[k]
        pk = params if problems == 1 else tuple(q[k] for q in params)
        e = ref.on_cpu(ref.forward, cell, xp[:, sl], wk, tuple(s[sl] for s in s0), pk, False, kind)
        for i, (a, b) in enumerate(zip(got, e)):
            err = ref.max_rel_err(a[:, sl], b)
            assert err < TOL[kind], f"forward output {i} of problem {k}: {err:.2e} ({pf})"
    # backward on the kernel's own forward (its dhp / dh feed the next projections)
    seqs, hp = got[:-1], got[-1]
    prevs = ref.prevs_of(s0, seqs)
    d_outs = ref.cotangents(cell, L, xp.shape[1], H)
    mx.eval(prevs, d_outs)
    dx, dhp, d0 = P.persistent_backward(cell, d_outs, xp, hp, prevs, params, w, True, use_plan=pb)
    mx.eval(dx, dhp, d0)
    for k in range(problems):
        sl = slice(k * rows, (k + 1) * rows)
        wk = w if problems == 1 else w[k]
        if not pb.mma:  # an FMA backward holds its W_h slice as w_dtype (a float16 layer's as float16
            wk = wk.astype(pb.w_dtype).astype(mx.float32)  # where float32 does not fit)
        pk = params if problems == 1 else tuple(q[k] for q in params)
        rdx, rdhp, rd0 = ref.on_cpu(ref.backward, cell, tuple(d[:, sl] for d in d_outs), xp[:, sl], hp[:, sl],
                                    tuple(p[:, sl] for p in prevs), pk, wk, True, pb.mma)
        tol = TOL[pb.mma] if pb.mma else ref.gpu_tol(L)
        assert ref.max_rel_err(dx[:, sl], rdx) < tol, pb
        assert ref.max_rel_err(dhp[:, sl], rdhp) < tol, pb
        for a, e in zip(d0, rd0):
            assert ref.max_rel_err(a[sl], e) < tol, pb
    return got, (dx, dhp, d0)


@pytest.mark.parametrize("weights", ["mma", "mma_global"])
@pytest.mark.parametrize("xdt", [mx.float32, mx.bfloat16], ids=["tf32", "bf16"])
def test_mma_lengths_and_directions(xdt, weights):
    """Two reversed / forward problems with per-row lengths, problem-interleaved I/O
    (W_h a slice, or streamed)."""
    kind = KIND[xdt]
    cell, L, B, H, problems = "lstm", 7, 16, 64, 2
    lens = [7, 3, 1, 5] * 8

    def forward(*args, lens, rev, interleaved):
        p = P.select("forward", cell, args[0], args[1], weights=weights)
        assert p is not None and p.mma == kind and p.w_global == (weights == "mma_global")
        return P.persistent_sequence(cell, *args, use_plan=p, lens=lens, rev=rev, interleaved=interleaved)

    def backward(*args, lens, rev, d_out, interleaved):
        p = P.select("backward", cell, args[1], args[5], weights=weights)
        assert p is not None and p.mma == kind and p.w_global == (weights == "mma_global")
        return P.persistent_backward(cell, *args, use_plan=p, lens=lens, rev=rev, d_out=d_out,
                                     interleaved=interleaved)

    ref.check_varlen(cell, L, B, H, xdt, False, lens, 0b10, problems, forward, backward, on=ref.on_cpu,
                     tol=(TOL[kind], 10 * TOL[kind]), interleaved=True, mma=kind)


def test_default_selection_takes_tensor_cores_for_a_wide_batch():
    assert P.device_limits().cc_major >= 8  # the H100 / H200 this suite runs on
    xp, w, s0, params = _stacked("lstm", 4, 64, 256, mx.bfloat16, 4)
    p = P.select("forward", "lstm", xp, w)
    assert p is not None and p.mma == gpu.MMA_BF16
