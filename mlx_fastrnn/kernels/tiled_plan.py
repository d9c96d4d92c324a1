"""The tiled class's planner: how one persistent launch splits a problem over a
co-resident grid (units per block, batch groups, warp tasks, K-chunks, shared
memory), ranked by a cycles-per-step model and cached. Pure Python, unit-tested
on the CPU; :mod:`.persistent` turns a :class:`Plan` into a kernel and launches it.
"""

import functools
from dataclasses import dataclass, field

import mlx.core as mx

from .gpu import CELLS, _env_int, _env_switch, smem_budget

SYNC_STRIDE = 32  # uint32 words between the barrier counters of two batch groups (FRNN_SYNC_STRIDE)
MAX_N = 64  # most projection columns per block (accumulators per lane = RB * N)


@dataclass(frozen=True)
class Plan:
    """How one persistent launch splits the work (all ints are template constants)."""

    direction: str  # "forward" | "backward"
    cell: str
    G: int
    H: int
    B: int
    U: int  # hidden units per block
    NU: int  # blocks per batch group
    BB: int  # batch rows per group
    NBB: int  # batch groups
    BBP: int  # BB rounded up to RB
    RB: int  # rows per warp task
    KS: int  # K-splits
    KCH: int  # K-chunk staged at once
    TPB: int  # threads per block
    EPT: int  # cell elements per thread
    w_bf16: bool  # W_h slice held as bfloat16
    smem: int  # dynamic shared memory bytes
    cost: float = field(default=0.0, compare=False)  # model cycles per step
    # Independent problems in one launch (the directions of a bidirectional
    # layer): each has B rows and its own W_h and per-unit parameters; its NBB
    # batch groups never meet another problem's at a barrier.
    NP: int = 1
    # W_h streamed from global memory (L2) every step instead of held in shared
    # memory (template WG): for W_h slices no shared memory holds
    w_global: bool = False
    # Column splits of the projection's warp tasks (template NCS): a task takes RB rows
    # of N / NCS columns, so each W_h load feeds RB rows' FMAs (RB * N / NCS <= 32
    # accumulators a lane)
    NCS: int = 1

    @property
    def K(self):
        return self.H if self.direction == "forward" else self.G * self.H

    @property
    def N(self):
        return self.G * self.U if self.direction == "forward" else self.U

    @property
    def nblocks(self):
        return self.NU * self.NBB * self.NP

    @property
    def sync_words(self):
        return self.NBB * self.NP * SYNC_STRIDE  # >= 128 bytes: never the scalar pool


def smem_bytes(K, N, BBP, KCH, KS, w_bytes, w_global=False):
    """Shared memory of one block (``frnn::carve``'s layout); ``w_global``: a
    streamed W_h, whose rows' K-chunk ([N][KCH] float) is staged instead of a slice."""
    return 4 * (BBP * KCH + KS * BBP * N) + (4 * N * KCH if w_global else N * K * w_bytes)


def _weight_options(weights, x_dtype):
    if weights in ("float32", "global"):
        return (False,)
    if weights == "bfloat16":
        return (True,)
    if weights != "auto":
        raise ValueError(f"weights must be 'auto', 'float32', 'bfloat16' or 'global', not {weights!r}")
    # bfloat16 W only when float32 does not fit and the input is already half.
    return (False, True) if x_dtype in (mx.float16, mx.bfloat16) else (False,)


def _cdiv(a, b):
    return -(-a // b)


def _cost(direction, G, K, N, U, BBP, BB, RB, KS, KCH, TPB, EPT, w_bytes, w_global=False, NCS=1):
    """A rough cycles-per-step model of one block (to rank candidates; tune on
    the device): a fixed barrier + latency term, staging from L2 (~32 B/clk),
    shared-memory loads and shuffles at one warp instruction per clock, FMAs at
    four, and the cell's elementwise work; a streamed W_h adds its slice read
    from L2 (~32 B/clk) every step. A task of NCS column splits loads RB rows and
    N / NCS columns per k-iteration."""
    chunks = _cdiv(K, KCH)
    tasks = (BBP // RB) * KS * NCS
    nc = N // NCS
    iters = _cdiv(_cdiv(KCH, 32), KS)  # k-iterations of one lane per task and chunk
    per_task = iters * (RB + nc + RB * nc / 4.0) + RB * nc * 5
    matvec = tasks * chunks * per_task
    stage = BBP * K * 4 / 32.0 + chunks * 600.0
    cell = EPT * (G * 40 + 60) * (2 if direction == "backward" else 1)
    stream = N * K * 4 / 32.0 if w_global else 0.0
    return 2000.0 + stage + matvec + cell + stream


def plan(direction, cell, H, B, limits, *, x_dtype=mx.float32, tpb=256, weights="auto", nbb=None,
         problems=1):
    """The cheapest feasible split for one launch, or ``None``.

    ``None`` when nothing fits: the W_h slice of the smallest unit split (or
    the accumulators) exceeds the shared-memory / register budget.
    ``nbb`` restricts the candidates to that many batch groups (for tuning).
    ``problems`` independent problems of ``B`` rows each share the launch: each
    gets ``1/problems`` of the blocks. ``weights="global"``: W_h streamed from
    global memory every step (``Plan.w_global``; hidden units per block a divisor
    of H), shared memory only for the staged rows and partial sums.
    """
    # Cached (the search took ~20 us, twice per training call); the env
    # overrides the search reads are part of the key.
    return _plan(direction, cell, H, B, limits, x_dtype, tpb, weights, nbb, problems,
                 _env_int("MLX_FASTRNN_PERSISTENT_SMEM"), _env_int("MLX_FASTRNN_PERSISTENT_BLOCKS"),
                 column_splits_enabled())


def column_splits_enabled():
    """Whether the planner may split the projection's warp tasks by columns (``Plan.NCS``);
    ``MLX_FASTRNN_PERSISTENT_COLSPLIT=0`` keeps whole-column tasks (the kernels before)."""
    return _env_switch("MLX_FASTRNN_PERSISTENT_COLSPLIT") is not False


@functools.lru_cache(maxsize=256)
def _plan(direction, cell, H, B, limits, x_dtype, tpb, weights, nbb, problems, _smem_env, _blocks_env, colsplit):
    if direction not in ("forward", "backward") or cell not in CELLS:
        raise ValueError(f"unknown direction/cell {direction!r}/{cell!r}")
    if limits is None or H < 1 or B < 1 or tpb % 32 or not 32 <= tpb <= 1024:
        return None
    G = CELLS[cell].num_gates
    K = H if direction == "forward" else G * H
    budget = smem_budget(limits)
    max_blocks = limits.max_blocks // max(1, problems)
    if max_blocks < 1 or budget <= 0:
        return None
    nw = tpb // 32
    glob = weights == "global"
    best = None
    seen = set()
    nbb_try = 1
    while nbb_try <= min(B, max_blocks):
        BB = -(-B // nbb_try)
        NBB = -(-B // BB)
        nbb_try *= 2
        if (BB, NBB) in seen or (nbb is not None and NBB != nbb):
            continue
        seen.add((BB, NBB))
        max_nu = max_blocks // NBB
        if max_nu < 1:
            continue
        U = -(-H // max_nu)
        while glob and H % U:  # a streamed W_h: no block with rows past H
            U += 1
        NU = -(-H // U)
        N = G * U if direction == "forward" else U
        if N > MAX_N:
            continue
        EPT = -(-(BB * U) // tpb)
        if EPT > CELLS[cell].max_ept:
            continue
        for RB, NCS in _task_shapes(N, BB, colsplit):
            BBP = -(-BB // RB) * RB
            rg = BBP // RB * NCS  # warp tasks of one K-split
            for w_bf16 in _weight_options(weights, x_dtype):
                w_bytes = 0 if glob else 2 if w_bf16 else 4
                KS = 1 if rg >= nw else max(1, min(nw // rg, -(-K // 32)))
                room = budget - smem_bytes(K, N, BBP, 0, KS, w_bytes, glob)
                per_k = 4 * (BBP + (N if glob else 0))  # staged bytes per k of a chunk
                if room < per_k * 32:
                    continue
                KCH = K if per_k * K <= room else (room // per_k) // 32 * 32
                KS = max(1, min(KS, -(-KCH // 32)))
                smem = smem_bytes(K, N, BBP, KCH, KS, w_bytes, glob)
                if smem > budget:
                    continue
                cost = _cost(direction, G, K, N, U, BBP, BB, RB, KS, KCH, tpb, EPT, w_bytes, glob, NCS)
                p = Plan(direction, cell, G, H, B, U, NU, BB, NBB, BBP, RB, KS, KCH, tpb, EPT,
                         w_bf16, smem, cost, problems, glob, NCS)
                key = (cost, p.nblocks, w_bf16, NCS)
                if best is None or key < (best.cost, best.nblocks, best.w_bf16, best.NCS):
                    best = p
                break  # float32 fits: no need for bfloat16
    return best


def _task_shapes(N, BB, colsplit=True):
    """(rows RB, column splits NCS) of the projection's warp tasks to try: the
    whole N columns with the most rows that keep RB * N <= 32 accumulators (one
    row at N > 32); with ``colsplit`` also, per split of N into 2, 4 or 8, the most
    rows (up to 8, at most BB) with RB * N / NCS <= 32."""
    shapes = [(next((rb for rb in (4, 2) if rb * N <= 32 and rb <= BB), 1), 1)]
    if colsplit:
        for ncs in (2, 4, 8):
            if N % ncs:
                continue
            rb = next((r for r in (8, 4, 2) if r * (N // ncs) <= 32 and r <= BB), None)
            if rb is not None and rb > shapes[0][0]:
                shapes.append((rb, ncs))
    return shapes
