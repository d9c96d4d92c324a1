"""Which tiled plan a launch runs (:mod:`.persistent` launches it).

The shape checks of the tiled class, then the planner's candidates
(:mod:`.tiled_plan`) and the measured rules between them and the per-step
cells: a W_h slice in shared memory, W_h streamed from L2 (FMA or tensor
cores), the elements-per-thread fallback, several problems in one launch.
``None`` means the per-step path.
"""

import mlx.core as mx

from .gpu import CELLS, MAX_EPT, _env_switch, device_limits, enabled
from .tiled_plan import MMA_MARGIN, plan

X_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
INDEX_LIMIT = 2**31 - 1


def _check_common(cell_name, xp, w_h):
    """(G, L, B, H, NP) if xp / w_h are what the persistent path takes, else None.

    ``w_h`` is [G*H, H], or [NP, G*H, H] for NP independent problems whose rows
    are stacked in ``xp`` [L, NP*B, G*H] (problem-major); B is rows per problem."""
    if cell_name not in CELLS or not enabled():
        return None
    G = CELLS[cell_name].num_gates
    if xp.ndim != 3 or xp.dtype not in X_DTYPES or w_h.ndim not in (2, 3) or w_h.dtype != mx.float32:
        return None
    NP = 1 if w_h.ndim == 2 else w_h.shape[0]
    L, rows, GH = xp.shape
    H = w_h.shape[-1]
    if NP < 1 or rows % NP:
        return None
    B = rows // NP
    if L < 1 or B < 1 or H < 1 or GH != G * H or tuple(w_h.shape[-2:]) != (G * H, H):
        return None
    if L * rows * GH > INDEX_LIMIT or NP * G * H * H > INDEX_LIMIT:
        return None
    return G, L, B, H, NP


def select(direction, cell_name, xp, w_h, limits=None, tpb=256, weights="auto"):
    """The plan the entry points would use, or ``None`` (fallback)."""
    dims = _check_common(cell_name, xp, w_h)
    if dims is None:
        return None
    G, L, B, H, NP = dims
    if limits is None:
        limits = device_limits()
    p = plan(direction, cell_name, H, B, limits, x_dtype=xp.dtype, tpb=tpb, weights=weights, problems=NP)
    if p is None and weights == "auto" and ept_fallback_enabled():
        p = plan(direction, cell_name, H, B, limits, x_dtype=xp.dtype, tpb=tpb, problems=NP, ept=MAX_EPT)
    if weights == "auto" and (p is None or p.cost > STREAMED_MIN_CYCLES):
        mode = streamed_mode()
        g = plan(direction, cell_name, H, B, limits, x_dtype=xp.dtype, tpb=tpb, weights="global",
                 problems=NP) if mode != "off" else None
        if g is not None and p is None:
            if mode == "on" or g.cost <= STREAMED_MAX_CYCLES and (
                    not g.mma or g.step_l2_bytes <= STREAMED_MMA_MAX_L2_BYTES
                    or _streamed_fma_runs(direction, cell_name, H, B, limits, xp.dtype, tpb, NP)):
                p = g
        elif g is not None and g.mma and g.cost < MMA_MARGIN * p.cost:
            # a streamed tensor-core plan against a slice plan the shared memory starves
            # (e.g. an FMA plan of a few staged columns per chunk): the tensor-core margin
            p = g
    if p is None or p.nblocks > limits.num_sms or p.NU * (L + 1) >= 2**31:
        return None
    return p


def ept_fallback_enabled():
    """Whether a launch no plan takes within its cell's elements-per-thread bound (the
    sLSTM's backward: two) may run a plan of up to ``gpu.MAX_EPT`` (four) instead of
    the step loop (default on; ``MLX_FASTRNN_PERSISTENT_EPT_FALLBACK=0`` turns it off).
    Such a kernel spills registers (the sLSTM backward at four: 132-396 bytes, NVRTC
    13.0), but the step loop it replaces took ~345 us a step. A/B in alternating rounds
    on the H200 (2026-12-04, ``env_ab.py``, ``flashrnn`` sLSTM N = 16 D = 256, B = 64
    T = 256): forward + backward 62.5 -> 26.1 ms in bfloat16, 63.7 -> 45.7 ms in float32;
    the forward and the drop-in layers timed beside it unchanged (0.92-1.09)."""
    return _env_switch("MLX_FASTRNN_PERSISTENT_EPT_FALLBACK") is not False


# A streamed W_h (``Plan.w_global``) re-reads the whole W_h from L2 (or memory) every
# step, so it beats the per-step cells (one cuBLAS matmul + one kernel per step) only
# while the planner's per-step cost stays moderate. Measured on the H200 (2026-12-04,
# benchmarks/RESULTS.md "Column splits, and the streamed W_h past a slice's capacity": the
# kernel that stages each K-chunk of W_h in shared
# memory, in alternating rounds against MLX_FASTRNN_PERSISTENT_STREAMED=0): faster at
# every plan costed up to 168,536 cycles per step (LSTM 16x256x1024 0.31-0.36x the
# per-step time, LSTM 4x50x2048 0.51-0.64x, GRU 8x128x2048 0.61-0.68x, LSTM 8x128x2048
# 0.65-0.67x, GRU 128x50x1024 0.66-0.82x), slower at LSTM 64x50x1536 (plans of 203,888
# and 236,236: 1.58-1.72x, where cuBLAS's GEMM per step wins). The bound sits between.
STREAMED_MAX_CYCLES = 186_000
# A streamed tensor-core plan's per-step model counts one block's reads, not the grid's:
# where no slice plan exists and no streamed FMA plan would run either, it replaces the
# per-step cells (one GEMM a step, reading W_h once) only while the whole grid reads at
# most this many bytes from L2 a step (``Plan.step_l2_bytes``: every block's staged rows,
# each batch group's W_h). On the H200 (2026-12-04, against the per-step cells): faster at
# 52-88 MB (LSTM 128x50x1024 float32 forward 0.42x in alternating rounds, GRU 64x50x1536
# bfloat16 forward 0.52x, LSTM 64x50x1536 float32 forward 0.96x), slower at 201 MB (LSTM
# 64x50x1536 float32's backward, whose four batch groups each read all of W_h: forward +
# backward 1.09x) and at 125 MB (its bfloat16 backward, against another lease's sweep).
STREAMED_MMA_MAX_L2_BYTES = 110_000_000
# A plan whose W_h slice fits shared memory is compared with the streamed tensor-core plan
# only above this modelled cost per step (below it the slice's plan is kept unasked: the
# streamed plan reads all of W_h from L2 every step).
STREAMED_MIN_CYCLES = 40_000


def streamed_mode():
    """``MLX_FASTRNN_PERSISTENT_STREAMED``: ``"on"`` (1/true/on/yes: every W_h no
    shared-memory plan holds streams), ``"off"`` (0/false/off/no: never), else
    ``"auto"`` (the default: where the plan's cost is within
    :data:`STREAMED_MAX_CYCLES`)."""
    return {True: "on", False: "off", None: "auto"}[_env_switch("MLX_FASTRNN_PERSISTENT_STREAMED")]


# Whether the tiled class may run several problems in one launch (``classes.accepts``),
# by what the problems are (``kind``):
# * ``"heads"``, a multi-head layer's heads: always. The alternative is the dense
#   block-diagonal W_h, N times the work, which beyond N*D of ~768 (LSTM, float32) fits
#   no kernel at all: on the H200 (2026-12-03, flashrnn_bench.py B=16 T=1024) LSTM N=4
#   D=256 ran 60 ms forward that way, N=16 D=128 79 ms.
# * ``"directions"``, a bidirectional layer's two directions (the second reversed inside
#   the kernel, x and the output problem-interleaved), in every dtype, but only where one
#   launch pays over the sequence (``classes.accepts``: each direction gets half the
#   grid; 16x1024x512 ran 1.2-1.7x slower as one launch). On the H200 (2026-12-04,
#   benchmarks/results/h200_bidir_ab_probe.json: alternating rounds, one 1-layer
#   bidirectional LSTM / GRU against one direction) the one launch took 1.09-1.24x one
#   direction's time at 1x256x256 in float32 and bfloat16, a launch per direction
#   1.24-1.35x; at 32x40x200 the one launch
#   was faster in 15 of 16 cases of both dtypes (benchmarks/RESULTS.md). (Before the
#   interleaved layout, bfloat16 kept a launch per direction: 2026-12-03 the one launch
#   lost 7 of 8 bfloat16 pairs at 32x40x200.)
# MLX_FASTRNN_PERSISTENT_PROBLEMS=1 / 0 overrides both.
MULTI_PROBLEM_KINDS = ("heads", "directions")


def multi_problem_enabled(kind="directions"):
    if kind not in MULTI_PROBLEM_KINDS:
        raise ValueError(f"kind must be one of {MULTI_PROBLEM_KINDS}, not {kind!r}")
    return _env_switch("MLX_FASTRNN_PERSISTENT_PROBLEMS") is not False


def _streamed_fma_runs(direction, cell_name, H, B, limits, x_dtype, tpb, NP):
    """Whether the streamed FMA plan would run where no tensor-core plan may (the
    plans of before ``tiled_plan.mma_fit_enabled``): its streamed tensor-core
    counterpart replaces it whatever the grid's L2 traffic (the same bytes a step)."""
    f = plan(direction, cell_name, H, B, limits, x_dtype=x_dtype, tpb=tpb, weights="global", problems=NP, mma=0)
    return f is not None and f.cost <= STREAMED_MAX_CYCLES
