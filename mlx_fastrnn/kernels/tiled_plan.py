"""The tiled class's planner: how one persistent launch splits a problem over a
co-resident grid (units per block, batch groups, warp tasks, K-chunks, shared
memory), ranked by a cycles-per-step model and cached. Pure Python, unit-tested
on the CPU; :mod:`.persistent` turns a :class:`Plan` into a kernel and launches it.
"""

import functools
from dataclasses import dataclass, field

import mlx.core as mx

from .gpu import CELLS, MMA_BF16, MMA_F16, MMA_NONE, MMA_TF32, _env_int, _env_switch, mlx_cuda_graphs, mma_kind, smem_budget

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
    w_half: bool  # W_h slice held in 16 bits (``w_dtype``: the input's half type)
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
    # The projection on tensor cores (template MMA, ``gpu.MMA_*``; 0: float32 FMA):
    # rows of 8 (RB = 8), the W_h slice in shared memory as the MMA's type (tf32: float32)
    mma: int = 0
    # Thread-block cluster of the batch group (template CLU; 0: none): the group's NU
    # blocks are one cluster (NU = CL <= MAX_CLUSTER) and meet at the hardware cluster
    # barrier instead of the grid barrier's counter in global memory
    CL: int = 0
    # A pipelined projection (template PIPE; tensor-core plans of several K-chunks): two
    # buffers of staged rows (and of a streamed W_h's chunk), the next chunk's copies in
    # flight while this chunk's MMAs run
    pipe: bool = False
    # Staged rows as the MMA's 16-bit type (template HR; bfloat16 / float16 plans, not
    # pipelined): each element rounded once while staged instead of at every fragment load
    # of every warp task, half the shared memory and half the fragment loads (same numbers)
    hrows: bool = False
    # float16 input: a 16-bit W_h is float16 (a float16 layer's own weights: exact, where a
    # bfloat16 copy would drop 3 of their 11 significant bits); else bfloat16
    f16: bool = False

    @property
    def w_dtype(self):
        """The dtype of the W_h operand the kernel reads."""
        if self.mma:
            return {MMA_BF16: mx.bfloat16, MMA_F16: mx.float16}.get(self.mma, mx.float32)
        if not self.w_half:
            return mx.float32
        return mx.float16 if self.f16 else mx.bfloat16

    @property
    def wld(self):
        """Row stride of the W_h slice in shared memory (template WLD; a streamed tensor-core
        plan's staged K-chunk: its width is KCH)."""
        return mma_strides(self.mma, self.KCH if self.w_global and self.mma else self.K, self.KCH)[0]

    @property
    def hld(self):
        """Row stride of the staged rows (template HLD; elements of the rows' type)."""
        return mma_strides(self.mma, self.K, self.KCH, self.hrows)[1]

    @property
    def K(self):
        return self.H if self.direction == "forward" else self.G * self.H

    @property
    def N(self):
        return self.G * self.U if self.direction == "forward" else self.U

    @property
    def step_l2_bytes(self):
        """Bytes the whole grid reads from L2 a step: every block's staged rows (BBP x K
        float32) and, streamed, each batch group's copy of its problem's W_h."""
        staged = self.nblocks * self.BBP * self.K * 4
        if not self.w_global:
            return staged
        return staged + self.NBB * self.NP * self.G * self.H * self.H * self.w_dtype.size

    @property
    def nblocks(self):
        return self.NU * self.NBB * self.NP

    @property
    def sync_words(self):
        return self.NBB * self.NP * SYNC_STRIDE  # >= 128 bytes: never the scalar pool


def smem_bytes(K, N, BBP, KCH, KS, w_bytes, w_global=False, mma=0, pipe=False, hrows=False):
    """Shared memory of one block (``frnn::carve``'s layout); ``w_global``: a
    streamed W_h, whose rows' K-chunk ([N][KCH] float) is staged instead of a slice;
    ``mma``: a tensor-core plan's padded slice (whole 16-row tiles, ``mma_strides``),
    streamed: its K-chunk in the same padded layout (row stride from KCH); ``pipe``
    (tensor-core plans): two buffers of staged rows (streamed: and of the W chunk);
    ``hrows``: the staged rows as 16-bit values (``Plan.hrows``)."""
    if mma:
        wld, hld = mma_strides(mma, KCH if w_global else K, KCH, hrows)
        nb = 2 if pipe else 1
        w = _cdiv(N, 16) * 16 * wld * w_bytes
        return (2 if hrows else 4) * nb * BBP * hld + 4 * KS * BBP * N + (nb * w if w_global else w)
    return 4 * (BBP * KCH + KS * BBP * N) + (4 * N * KCH if w_global else N * K * w_bytes)


def mma_strides(mma, K, KCH, hrows=False):
    """(WLD, HLD): the row strides of the W_h slice and of the staged rows. For the
    FMA projection K and KCH. A tensor-core plan pads both so that a warp's fragment
    loads hit 32 different banks: the 8 fragment rows (lanes g) of a 16-bit W row
    pair start 4 words apart (WLD = 8 mod 64 elements), the rows' float pairs 8
    words apart (HLD = 8 mod 32); tf32 reads single words, 4 apart (4 mod 32); 16-bit
    staged rows (``hrows``) are read as W is (8 mod 64 elements)."""
    if not mma:
        return K, KCH
    if mma == MMA_TF32:
        return _cdiv(K, 32) * 32 + 4, _cdiv(KCH, 32) * 32 + 4
    return _cdiv(K, 64) * 64 + 8, (_cdiv(KCH, 64) * 64 + 8 if hrows else _cdiv(KCH, 32) * 32 + 8)


def _weight_options(weights, x_dtype):
    if weights in ("mma", "mma_global"):
        return ()  # no FMA candidates
    if weights in ("float32", "global"):
        return (False,)
    if weights == "half":
        return (True,)
    if weights != "auto":
        raise ValueError(f"weights must be 'auto', 'float32', 'half', 'global', 'mma' or 'mma_global', "
                         f"not {weights!r}")
    # 16-bit W only when float32 does not fit and the input is already half.
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
         problems=1, mma=None, ept=None, cluster=None):
    """The cheapest feasible split for one launch, or ``None``.

    ``None`` when nothing fits: the W_h slice of the smallest unit split (or
    the accumulators) exceeds the shared-memory / register budget.
    ``nbb`` restricts the candidates to that many batch groups (for tuning).
    ``problems`` independent problems of ``B`` rows each share the launch: each
    gets ``1/problems`` of the blocks. ``weights="global"``: W_h streamed from
    global memory every step (``Plan.w_global``; hidden units per block a divisor
    of H), shared memory only for the staged rows and partial sums (and each K-chunk
    of the block's W_h rows). ``weights="auto"``: the W_h slice as float32 where that
    fits, else, for a float16 / bfloat16 input, in that 16-bit type (``Plan.w_dtype``);
    ``"float32"`` / ``"half"`` force either (``"half"`` with a float32 input: bfloat16).
    ``mma``: the tensor-core operand type the candidates may use (``gpu.MMA_*``;
    default ``gpu.mma_kind(x_dtype)`` with ``weights="auto"``, and with ``"global"``
    where ``mma_fit_enabled()``, else none); the FMA candidates compete with them on
    the cost model. ``mma=0``: FMA only.
    ``weights="mma"``: tensor-core candidates only (``mma`` or, by default,
    ``gpu.mma_kind(x_dtype)``; None where that is none); ``"mma_global"``: the same
    with W_h streamed. No tensor-core plans on a GPU
    before compute capability 8 (or an unknown one: ``Limits.cc_major``), and none for
    a float16 backward: its cotangents (the rounded operand) can lie far below
    float16's range (1e-7 is common without loss scaling), where bfloat16 and tf32
    keep float32's. ``ept``: the most cell elements per thread instead of the cell's
    own bound for this direction (``CellSpec.max_ept`` / ``max_ept_backward``).
    ``cluster``: whether batch groups of at most ``MAX_CLUSTER`` blocks (backward
    ``MAX_CLUSTER_BACKWARD``) may be thread-block clusters (``Plan.CL``), competing on the
    cost model (default ``clusters_enabled()``); never before compute capability 9.
    """
    if mma is None:
        mma = mma_kind(x_dtype) if weights in ("auto", "mma", "mma_global") or (
            weights == "global" and mma_fit_enabled()) else MMA_NONE
    if limits is not None and limits.cc_major < 8 or (mma == MMA_F16 and direction == "backward"):
        mma = MMA_NONE
    if cluster is None:
        cluster = clusters_enabled()
    cluster = bool(cluster) and limits is not None and limits.cc_major >= 9
    # Cached (the search took ~20 us, twice per training call); the env
    # overrides the search reads are part of the key.
    return _plan(direction, cell, H, B, limits, x_dtype, tpb, weights, nbb, problems,
                 _env_int("MLX_FASTRNN_PERSISTENT_SMEM"), _env_int("MLX_FASTRNN_PERSISTENT_BLOCKS"),
                 column_splits_enabled(), int(mma), ept, cluster, mma_fit_enabled(), pipeline_enabled(),
                 half_rows_enabled())


def clusters_enabled():
    """Whether the planner may make a batch group a thread-block cluster (``Plan.CL``):
    only where MLX runs kernels without CUDA graphs (``MLX_USE_CUDA_GRAPHS=0``), and there
    unless ``MLX_FASTRNN_PERSISTENT_CLUSTER=0``.

    A cluster's size is the kernel's compile-time ``__cluster_dims__`` (MLX's cuda_kernel
    launches without cluster dimensions). MLX replays a CUDA graph of the same node
    structure by updating the kernel nodes in place (``cudaGraphExecUpdate``), and such an
    update does not carry a function's cluster shape (MLX's own comment in
    ``backend/cuda/device.cpp``, where it keeps cuDNN's subgraphs with clusters out of
    updates). On the H200 (2026-12-04), ``test_persistent_cuda.py`` and
    ``test_recurrent_fast_vs_legacy.py`` with cluster plans under CUDA graphs: 38 failures
    and more (the log was cut), wrong results and launch failures, in later non-cluster
    kernels too; with ``MLX_USE_CUDA_GRAPHS=0`` all 363 tests passed."""
    return _env_switch("MLX_FASTRNN_PERSISTENT_CLUSTER") is not False and not mlx_cuda_graphs()


# The most blocks of a cluster: the portable size (16 needs a launch attribute MLX's
# cuda_kernel cannot set); for the backward 4. A/B in alternating rounds on the H200
# (2026-12-04, MLX_USE_CUDA_GRAPHS=0, benchmarks/RESULTS.md): forward cluster plans of
# 8 blocks 1.06-1.33x as fast as the grid plans (GRU 8x512x128 1.33x, 16x200x128 1.27x,
# LSTM 32x100x128 1.19x); backward plans of 8 blocks 0.92x and 0.97x (LSTM 32x40x200,
# GRU 64x256x256), of 4 blocks 1.00-1.05x.
MAX_CLUSTER = 8
MAX_CLUSTER_BACKWARD = 4
# What a cluster barrier saves against the grid barrier, in the model's cycles per step:
# on the H200 (2026-12-04, benchmarks/RESULTS.md, a probe kernel: a DSMEM write and
# cluster.sync per step, 16 clusters) 0.21 us a step at 1 block, 0.28 at 2, 0.32 at 4,
# 0.46 at 8, against ~0.6-0.7 us for the grid barrier (RESULTS.md, the kernel-alone
# table), ~1.9 GHz.


def cluster_saving(CL):
    """Model cycles a step saved by a cluster of ``CL`` blocks (0: no cluster)."""
    return 0.0 if not CL else 800.0 if CL <= 2 else 700.0 if CL <= 4 else 450.0


def _unit_splits(H, max_nu, glob, cluster):
    """(U, NU, CL) of a batch group to try: the most blocks (``max_nu``), and with
    ``cluster`` (the most blocks of a cluster, 0: none) the splits into at most 2, 4, 8
    blocks up to it as clusters (NU = CL: 3, 5-7 where H divides so; one candidate per
    cluster size, the grid split of the same NU kept beside it)."""
    def units(blocks):  # hidden units per block for at most ``blocks`` blocks
        U = -(-H // blocks)
        while glob and H % U:  # a streamed W_h: no block with rows past H
            U += 1
        return U, -(-H // U)

    splits = [(*units(max_nu), 0)]
    for cl in (c for c in (2, 4, 8) if c <= cluster):
        U, NU = units(cl)
        if 2 <= NU <= min(cl, max_nu) and all(NU != s[2] for s in splits):
            splits.append((U, NU, NU))
    return splits


def mma_fit_enabled():
    """Whether tensor-core plans may take fewer K-splits than warps where the warp-filling
    split's partial sums leave no room (e.g. LSTM H = 1024 at B = 128 in bfloat16), and may
    stream W_h (``Plan.w_global`` with ``mma``: H >= 1024, where no slice fits or the one
    that fits starves the staging); ``MLX_FASTRNN_PERSISTENT_MMA_FIT=0`` keeps the plans
    of before (the warp-filling split only, a shared-memory slice only)."""
    return _env_switch("MLX_FASTRNN_PERSISTENT_MMA_FIT") is not False


def pipeline_enabled():
    """Whether tensor-core plans of several K-chunks stage the next chunk while this one's
    MMAs run (``Plan.pipe``: two buffers, so a smaller chunk). Off until measured:
    ``MLX_FASTRNN_PERSISTENT_PIPELINE=1`` turns it on (for the A/B)."""
    return _env_switch("MLX_FASTRNN_PERSISTENT_PIPELINE") is True


def half_rows_enabled():
    """Whether bfloat16 / float16 tensor-core plans (not pipelined) stage their rows as
    that type (``Plan.hrows``: the same split, the same numbers, half the staged bytes in
    shared memory and no rounding at the fragment loads). Off: on the H200 (2026-12-05,
    benchmarks/RESULTS.md "16-bit staged rows", alternating rounds) it took 0.98-1.31x the
    float32-staged plans' time (LSTM / GRU 128x50x1024 bfloat16 forward 1.24x / 1.31x; no case
    below 0.98x). ``MLX_FASTRNN_PERSISTENT_HALF_ROWS=1`` turns it on."""
    return _env_switch("MLX_FASTRNN_PERSISTENT_HALF_ROWS") is True


def column_splits_enabled():
    """Whether the planner may split the projection's warp tasks by columns (``Plan.NCS``);
    ``MLX_FASTRNN_PERSISTENT_COLSPLIT=0`` keeps whole-column tasks (the kernels before)."""
    return _env_switch("MLX_FASTRNN_PERSISTENT_COLSPLIT") is not False


@functools.lru_cache(maxsize=256)
def _plan(direction, cell, H, B, limits, x_dtype, tpb, weights, nbb, problems, _smem_env, _blocks_env, colsplit,
          mma=MMA_NONE, ept=None, cluster=False, mma_fit=True, pipelined=False, half_rows=False):
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
    glob = weights in ("global", "mma_global")
    best = best_mma = None
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
        for U, NU, CL in _unit_splits(H, max_nu, glob,
                                      cluster and (MAX_CLUSTER if direction == "forward" else MAX_CLUSTER_BACKWARD)):
            N = G * U if direction == "forward" else U
            if N > MAX_N:
                continue
            EPT = -(-(BB * U) // tpb)
            if EPT > (ept or (CELLS[cell].max_ept if direction == "forward" else CELLS[cell].max_ept_backward)):
                continue
            if mma:
                p = _mma_candidate(direction, cell, G, H, B, K, U, NU, BB, NBB, N, EPT, tpb, budget, problems, mma,
                                   CL, glob, mma_fit, pipelined, half_rows)
                if p is not None and (best_mma is None or (p.cost, p.nblocks) < (best_mma.cost, best_mma.nblocks)):
                    best_mma = p
            for RB, NCS in _task_shapes(N, BB, colsplit):
                BBP = -(-BB // RB) * RB
                rg = BBP // RB * NCS  # warp tasks of one K-split
                for w_half in _weight_options(weights, x_dtype):
                    w_bytes = 0 if glob else 2 if w_half else 4
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
                    cost -= cluster_saving(CL)
                    p = Plan(direction, cell, G, H, B, U, NU, BB, NBB, BBP, RB, KS, KCH, tpb, EPT,
                             w_half, smem, cost, problems, glob, NCS, CL=CL, f16=x_dtype == mx.float16)
                    key = (cost, p.nblocks, w_half, NCS)
                    if best is None or key < (best.cost, best.nblocks, best.w_half, best.NCS):
                        best = p
                    break  # float32 fits: no 16-bit copy
    # The tensor-core plan where its model cost is clearly lower (MMA_MARGIN): at small
    # shapes the two are within the model's error, and the FMA plan wastes no padding.
    if weights in ("mma", "mma_global"):
        return best_mma
    if best_mma is not None and (best is None or best_mma.cost < MMA_MARGIN * best.cost):
        return best_mma
    return best


# Measured on the H200 (2026-12-04, benchmarks/RESULTS.md "Tensor cores": alternating rounds
# against MLX_FASTRNN_PERSISTENT_MMA=0, the whole layer / flashrnn call): where the model put
# the tensor-core plan at <= 0.59 of the FMA plan's cost it was 2-25% faster (0.39: GRU
# 256x50x256 0.81x, four heads of 256 at B=64 0.87x; 0.25: sixteen heads of 128 at B=64 0.76x);
# at 0.73-0.74 it was not (LSTM 16x1024x512 forward 1.07x, LSTM 32x40x200 1.01x, four heads of
# 128 at B=16 1.03x).
MMA_MARGIN = 0.6


def mma_tiles_per_task(nt):
    """Row tiles of 8 one tensor-core warp task takes: the largest divisor of ``nt``
    up to 8 (``frnn::mma_tiles_per_task``)."""
    return next(d for d in (8, 7, 6, 5, 4, 3, 2, 1) if nt % d == 0)


def _mma_candidate(direction, cell, G, H, B, K, U, NU, BB, NBB, N, EPT, tpb, budget, problems, mma, CL=0,
                   glob=False, fit=True, pipelined=False, half_rows=False):
    """The tensor-core plan of one (U, BB) split, or None where its padded W_h slice
    (the MMA's type; tf32 as float32) and a K-chunk of at least 32 do not fit; ``glob``:
    W_h streamed (``Plan.w_global``), each K-chunk of its rows staged in the slice's
    layout beside the chunk of h. The K-split that gives every warp a task where it
    fits, else (``fit``) the most that fits (its partial sums take shared memory too).
    ``pipelined``: a plan of several K-chunks takes the pipelined form (``Plan.pipe``)
    where its smaller chunk is at least 32. ``half_rows``: a bfloat16 / float16 plan not
    pipelined stages its rows as that type (``Plan.hrows``), on the same split."""
    nw = tpb // 32
    kstep = 8 if mma == MMA_TF32 else 16
    w_bytes = 4 if mma == MMA_TF32 else 2
    BBP = _cdiv(BB, 8) * 8
    MT = _cdiv(N, 16)
    tiles = MT * (BBP // 8 // mma_tiles_per_task(BBP // 8))  # warp tasks of one K-split
    ks_warps = 1 if tiles >= nw else max(1, min(nw // tiles, _cdiv(K, kstep)))
    for KS in range(ks_warps, 0 if fit else ks_warps - 1, -1):
        KCH = _mma_chunk(K, N, BBP, KS, w_bytes, budget, mma, glob)
        if KCH is None:
            continue
        KS = max(1, min(KS, _cdiv(KCH, kstep)))
        cost = _cost_mma(direction, G, K, N, BBP, BB, KS, KCH, EPT, mma) - cluster_saving(CL)
        if glob:
            cost += N * K * w_bytes / 32.0  # the rows' read from L2 every step, as _cost's
        pipe = False
        if pipelined and KCH < K:
            # several chunks: the pipelined form, costed as the unpipelined one (the switch
            # changes the kernel of a split, not which split is chosen: an A/B of the form)
            KCH2 = _mma_chunk_pipelined(K, N, BBP, KS, w_bytes, budget, mma, glob)
            if KCH2 is not None:
                KS2 = max(1, min(KS, _cdiv(KCH2, kstep)))  # no K-split without a k-step of the chunk
                if KS2 < KS:  # fewer partial sums: room for a larger chunk
                    KCH2 = _mma_chunk_pipelined(K, N, BBP, KS2, w_bytes, budget, mma, glob) or KCH2
                KCH, KS, pipe = KCH2, KS2, True
        hrows = half_rows and mma != MMA_TF32 and not pipe
        smem = smem_bytes(K, N, BBP, KCH, KS, w_bytes, glob, mma, pipe, hrows)
        return Plan(direction, cell, G, H, B, U, NU, BB, NBB, BBP, 8, KS, KCH, tpb, EPT, mma != MMA_TF32, smem,
                    cost, problems, glob, 1, mma, CL, pipe, hrows, mma == MMA_F16)
    return None


def _mma_chunk(K, N, BBP, KS, w_bytes, budget, mma, glob):
    """The K-chunk of a tensor-core plan: all of K (in whole 16s) where it fits, else the
    most multiples of 32 that do (at least 32), or None."""
    KCH = _cdiv(K, 16) * 16
    if smem_bytes(K, N, BBP, KCH, KS, w_bytes, glob, mma) <= budget:
        return KCH
    return _fitting_chunk(K, N, BBP, KS, w_bytes, budget, mma, glob, False, KCH)


def _mma_chunk_pipelined(K, N, BBP, KS, w_bytes, budget, mma, glob):
    """The K-chunk of a pipelined tensor-core plan (two buffers of staged rows, and of
    the W chunk when streamed): the most multiples of 32 below K that fit, or None."""
    return _fitting_chunk(K, N, BBP, KS, w_bytes, budget, mma, glob, True, K - 1)


def _fitting_chunk(K, N, BBP, KS, w_bytes, budget, mma, glob, pipe, most):
    """The most multiples of 32 up to ``most`` whose tensor-core plan fits ``budget``
    (at least 32), or None: an estimate from the bytes per k of the buffers that scale
    with the chunk (the staged rows; streamed, the W chunk), less the padded strides."""
    nb = 2 if pipe else 1
    nr = _cdiv(N, 16) * 16
    per_k = nb * 4 * BBP + (nb * nr * w_bytes if glob else 0)
    fixed = 4 * KS * BBP * N + (0 if glob else nr * mma_strides(mma, K, 0)[0] * w_bytes)
    KCH = min(most // 32 * 32, max(0, budget - fixed) // per_k // 32 * 32)
    while KCH >= 32 and smem_bytes(K, N, BBP, KCH, KS, w_bytes, glob, mma, pipe) > budget:
        KCH -= 32
    return KCH if KCH >= 32 else None


def _cost_mma(direction, G, K, N, BBP, BB, KS, KCH, EPT, mma):
    """``_cost`` for a tensor-core projection: per k-step of a task the W fragment
    (4 loads; tf32 4 more conversions), then per row tile its fragment (2-4 loads and
    2 conversions) and the mma (~2 issue slots); the same staging, cell and fixed terms."""
    kstep = 8 if mma == MMA_TF32 else 16
    MT = _cdiv(N, 16)
    NT = BBP // 8
    ntt = mma_tiles_per_task(NT)
    chunks = _cdiv(K, KCH)
    ksteps = _cdiv(K, kstep)  # over all chunks, per (row tile group, 16 W rows)
    per_kstep = (8 if mma == MMA_TF32 else 4) + ntt * ((4 if mma == MMA_TF32 else 6) + 2)
    matvec = MT * (NT // ntt) * ksteps * per_kstep + MT * NT * KS * chunks * 4 * 3
    stage = BBP * K * 4 / 32.0 + chunks * 600.0
    cell = EPT * (G * 40 + 60) * (2 if direction == "backward" else 1)
    return 2000.0 + stage + matvec + cell


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
