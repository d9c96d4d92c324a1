"""The resident class's planner: how one resident launch splits a problem (rows per
block and per thread, threads per unit, W_h in registers), ranked by a cycles-per-step
model and cached. Pure Python, unit-tested on the CPU; :mod:`.resident` turns a
:class:`ResidentPlan` into a kernel and launches it (as :mod:`.tiled_plan` for the
tiled class).
"""

import dataclasses
import functools
from dataclasses import dataclass

import mlx.core as mx

from .gpu import CELLS, _env_switch

MAX_TPB = 1024
ROWS_PER_BLOCK = (1, 2, 4, 8, 16, 32)  # candidate batch rows per block (BB)
ROWS_PER_THREAD = (1, 2, 4)  # candidate rows per thread (registers: 2 * RPT * (G + S) live values, prefetch included)


@dataclass(frozen=True)
class ResidentPlan:
    direction: str
    cell: str
    G: int
    H: int
    B: int  # rows per problem
    BB: int  # rows per block
    NBB: int  # blocks per problem
    RS: int  # row slices (threads per unit)
    RPT: int  # rows per thread = ceil(BB / RS)
    TPB: int
    w_half: bool  # W_h held in 16 bits (``w_dtype``: the input's half type)
    smem: int
    NP: int = 1
    cost: float = 0.0
    # Threads per unit splitting the projection's K (interleaved float4 chunks,
    # summed by warp shuffles): KSP times the warps, 1/KSP of each thread's
    # serial FMA chain. 1 (one thread per unit) unless the measured table asks.
    KSP: int = 1
    # The thread's share of W_h held in registers for the whole sequence (read once
    # from the shared copy): the step's projection then loads only its operand.
    # Where it fits (``with_registers``, which the class choice applies).
    WREG: bool = False
    # float16 input: a 16-bit W_h is float16 (exact for a float16 layer's weights); else bfloat16
    f16: bool = False

    @property
    def nblocks(self):
        return self.NBB * self.NP

    @property
    def w_dtype(self):
        """The dtype of the W_h operand the kernel reads."""
        if not self.w_half:
            return mx.float32
        return mx.float16 if self.f16 else mx.bfloat16

    @property
    def K(self):
        return self.H if self.direction == "forward" else self.G * self.H

    w_global = False  # W_h always in the block's shared memory (the shared operand code asks)


def _round(a, m):
    return -(-a // m) * m


def transposed_stride(G, H):
    """Row stride of the transposed W_h in shared memory: G*H made odd, so the
    prologue's transposing stores (consecutive k, one n) hit 32 different banks."""
    return G * H + 1 - (G * H) % 2


def smem_bytes(direction, G, H, BB, w_bytes):
    """hb / db [2][BB][KS] float32 (the step operand, double-buffered), then W_h
    (forward: transposed [KS][GHP], GHP = ``transposed_stride``; backward:
    [KS][H]), KS = K rounded up to 4 (zero-padded, so the projection reads
    whole float4s)."""
    K = H if direction == "forward" else G * H
    KS = _round(K, 4)
    N = transposed_stride(G, H) if direction == "forward" else H
    return 8 * BB * KS + KS * N * w_bytes


def _step_cost(direction, G, H, RPT, RS, TPB, w_bytes, ksp=1):
    """Cycles of one block's step (a ranking model; the device tuning decides):
    per k the warp issues G (forward) or 1 (backward) W loads, RPT/4 operand
    loads and G*RPT or RPT FMAs; warps share the SM's four schedulers; a K
    split over ``ksp`` threads shortens each chain and adds its shuffles."""
    K = H if direction == "forward" else G * H
    per_k = (G if direction == "forward" else 1) * (1 + RPT) + RPT / 4.0
    warps = TPB // 32
    issue = (K / ksp) * per_k * max(1.0, warps / 4.0)
    latency = (K / ksp) * 4.0 / max(1, min(4, G * RPT if direction == "forward" else RPT))  # FMA chains
    sums = (G if direction == "forward" else 1) * RPT
    reduce = (ksp.bit_length() - 1) * sums * 30.0  # log2(ksp) dependent shuffles per sum
    return 600.0 + max(issue, latency) + reduce + 200.0 * G


K_SPLITS = (1, 2, 4, 8)  # threads per unit a forward plan may take (KSP)


@functools.lru_cache(maxsize=256)
def plan(direction, cell, H, B, limits, x_dtype=mx.float32, problems=1, rows=None, rpt=None, ksp=1):
    """The resident plan for one launch, or ``None`` when W_h does not fit one
    block (``rows`` / ``rpt``: force that many batch rows per block / per
    thread, for tuning and for the measured table; ``ksp``: threads per unit
    splitting the projection's K). Among its candidates the cheapest whose
    registers fit the block (:func:`registers_fit`), if any does."""
    if limits is None or cell not in CELLS or H < 1 or B < 1:
        return None
    if ksp not in K_SPLITS:
        raise ValueError(f"ksp must be one of {K_SPLITS}, not {ksp!r}")
    G = CELLS[cell].num_gates
    HP = _round(H, 32)
    if HP > MAX_TPB:
        return None
    per_sm = limits.smem_per_sm or (limits.smem_per_block + limits.reserved_smem_per_block)
    best = best_fit = None
    for w_half in (False, True):
        if w_half and x_dtype not in (mx.float16, mx.bfloat16):
            break
        w_bytes = 2 if w_half else 4
        for BB in (rows,) if rows else sorted({min(B, b) for b in ROWS_PER_BLOCK}):
            smem = smem_bytes(direction, G, H, BB, w_bytes)
            if smem > limits.smem_per_block:
                continue
            NBB = -(-B // BB)
            nblocks = NBB * problems
            per_block_sm = max(1, min(per_sm // (smem + limits.reserved_smem_per_block),
                                      limits.threads_per_sm // HP))
            waves = -(-nblocks // (limits.num_sms * per_block_sm))
            for RPT in (min(rpt, BB),) if rpt else ROWS_PER_THREAD:
                RS = -(-BB // RPT)
                if RPT > BB and RPT != ROWS_PER_THREAD[0]:
                    break
                TPB = HP * RS * ksp
                if TPB > MAX_TPB:
                    continue
                cost = waves * _step_cost(direction, G, H, RPT, RS, TPB, w_bytes, ksp)
                p = ResidentPlan(direction, cell, G, H, B, BB, NBB, RS, RPT, TPB, w_half, smem, problems,
                                 cost, ksp, f16=x_dtype == mx.float16)
                if best is None or cost < best.cost:
                    best = p
                if registers_fit(p, limits) and (best_fit is None or cost < best_fit.cost):
                    best_fit = p
        if best is not None:
            break  # float32 W_h fits: no 16-bit copy
    return best_fit or best


# The registers a thread of the resident kernels takes besides a W_h share, from above:
# at one row a thread (forward flat; backward 40 and 4 per gate and state), and each
# further row 2 and 7 per gate and state (NVRTC 13.0, sm_90, every cell without WREG:
# forward 36-48 at one row a thread, 43-70 at two, 48-168 at four; backward 40 (RNN) to
# 69 (sLSTM), 54-127, 72-206, the GRU's 143 at four with the initial states' cotangents).
BASE_REGS = {"forward": (48, 0, 7), "backward": (40, 4, 7)}


def base_register_estimate(p):
    """The registers a thread of plan ``p`` takes without ``WREG``, from above."""
    base, per_unit, per_row = BASE_REGS[p.direction]
    units = p.G + CELLS[p.cell].num_states
    return base + per_unit * units + (p.RPT - 1) * (2 + per_row * units)


def registers_fit(p, limits):
    """Whether plan ``p``'s kernel (``WREG`` or not) fits the registers a thread of its
    block may take (the kernels are compiled with ``__launch_bounds__(TPB, 1)``: past
    that ptxas spills)."""
    need = register_estimate(p) if p.WREG else base_register_estimate(p)
    return need <= min(255, limits.regs_per_sm // p.TPB)


# W_h in registers (``WREG``): at most this many floats a thread, only in blocks of at
# most WREG_MAX_TPB threads (there any kernel of <= 255 registers a thread launches:
# 255 * 256 <= 65536; the resident kernels are compiled with __launch_bounds__(TPB, 1),
# so a larger block would cap the registers and spill), and only where the share plus
# the kernel's other registers stay within 255 (an estimate: where it is short, the
# bound makes ptxas spill, never a block that does not launch). The others, by rows per
# thread (NVRTC 13.0, sm_90, every cell with WREG: forward 32-51 registers at one row a
# thread, 33-63 at two, 39-119 at four; backward 28-68, 40-142, 56-202, each further
# row 6-37 registers, most for the cells with the most gates and states), bounded: one
# row a thread, and each further row (forward flat, backward per gate and state).
WREG_MAX_FLOATS = 128
WREG_MAX_TPB = 256
WREG_OTHER_REGS = {"forward": (56, 24), "backward": (72, 12)}


def register_floats(p):
    """The floats of W_h one thread of plan ``p`` holds under ``WREG``: G*4 per float4
    chunk of the forward's K = H, 4 per chunk of the backward's K = G*H; its chunks
    are every KSP-th."""
    chunks = -(-_round(p.K, 4) // 4 // p.KSP)
    return chunks * 4 * (p.G if p.direction == "forward" else 1)


def register_estimate(p):
    """The registers a thread of plan ``p`` takes under ``WREG``, from above (measured
    ones: :data:`WREG_OTHER_REGS`)."""
    base, per_row = WREG_OTHER_REGS[p.direction]
    if p.direction == "backward":
        per_row *= p.G + CELLS[p.cell].num_states
    return register_floats(p) + base + (p.RPT - 1) * per_row


def with_registers(p, limits):
    """``p`` with ``WREG`` where the thread's share fits (:data:`WREG_MAX_FLOATS`, blocks
    of at most :data:`WREG_MAX_TPB` threads, :func:`register_estimate` within 255 and
    the register file) and the launch has no more blocks than SMs (more registers a
    block could leave fewer blocks per SM: a second wave; not measured), else ``p``;
    ``MLX_FASTRNN_RESIDENT_WREG=0`` turns it off. On the H200 (2026-12-04, drop-in layers, alternating rounds against it off) it was
    faster on all 24 configurations timed, 1.01-1.89x (GRU / LSTM / RNN, B 1-256,
    H 32-128, float32 and bfloat16, forward and forward+backward, blocks of 64-256
    threads; benchmarks/RESULTS.md)."""
    if p is None or _env_switch("MLX_FASTRNN_RESIDENT_WREG") is False:
        return p
    if (register_floats(p) > WREG_MAX_FLOATS or p.TPB > WREG_MAX_TPB or p.nblocks > limits.num_sms
            or register_estimate(p) > min(255, limits.regs_per_sm // p.TPB)):
        return p
    return dataclasses.replace(p, WREG=True)
