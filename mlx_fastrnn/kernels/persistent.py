"""Persistent (whole-sequence) recurrence kernels on MLX's CUDA backend.

One launch runs all L steps of a GRU / LSTM / RNN layer (FlashRNN-style):

* The grid has ``NU * NBB`` blocks, never more than the GPU has SMs, and each
  block's shared memory is at most half of an SM's (so the grid is co-resident
  with room for a second persistent grid beside it; see ``smem_budget``).
  Block ``b`` owns hidden units ``[j0, j0+U)`` (all G gates of them) and batch
  rows ``[r0, r0+BB)``: ``j0 = (b % NU) * U``, ``r0 = (b // NU) * BB``.
* It keeps its slice of W_h (G*U rows of H forward, the U columns transposed
  backward) in shared memory for the whole sequence, as float32 (in the input's
  16-bit type only when float32 does not fit and the input is already half precision:
  float16 for float16, so a float16 layer's weights stay exact).
* Per step it stages its rows of h_{t-1} (backward: of dhp_{t+1}) from L2,
  projects them on the W_h slice (fp32 FMA, warp-per-task, lanes over K; or on
  tensor cores: ``Plan.mma``, mma.sync tiles), applies
  the cell, writes its slice of h_t (c_t, hp_t / dx_t, dhp_t), then waits on a
  barrier shared by the NU blocks of its batch group (monotone counter in an
  output buffer of >= 128 bytes: never MLX's scalar pool).

Entry points (the driver contract of ``ops/sequence.py``):

* :func:`persistent_sequence` -> ``(seqs..., hp)`` or ``None``
* :func:`persistent_backward` -> ``(dx, dhp, d_states0)`` or ``None``

``None`` means "not here": no CUDA device, a shape or dtype this path does not
take, or a problem whose W_h slice does not fit in shared memory; the caller
then runs the per-step path. The planning (:mod:`.tiled_plan`) and the GPU's
limits (:mod:`.gpu`) and the choice among the planner's candidates
(:mod:`.tiled_select`) are pure Python (unit-tested on the CPU), as is
:func:`kernel_spec` (its source: ``cuda_source.generate_source``, the exact
translation unit MLX builds, run by the CPU emulator and compiled by the NVRTC
check in the tests).
"""

import functools
import os

import mlx.core as mx

from .cuda_source import KernelSpec, launch, source_digest
from .gpu import (  # noqa: F401 - the kernels' names stay importable from here
    CELLS,
    MAX_EPT,
    Limits,
    _env_switch,
    cell_module,
    cuda_available,
    device_limits,
    enabled,
    query_cuda_limits,
    register_cell,
    smem_budget,
)
from .persistent_header import HEADER
from .tiled_plan import MAX_CLUSTER, MAX_N, SYNC_STRIDE, Plan, clusters_enabled, plan, smem_bytes  # noqa: F401
from .tiled_select import (  # noqa: F401 - the selection's names stay importable from here
    INDEX_LIMIT,
    MULTI_PROBLEM_KINDS,
    STREAMED_MAX_CYCLES,
    STREAMED_MIN_CYCLES,
    STREAMED_MMA_MAX_L2_BYTES,
    X_DTYPES,
    _check_common,
    _streamed_fma_runs,
    ept_fallback_enabled,
    multi_problem_enabled,
    select,
    streamed_mode,
)



# Kernel variants that MLX_FASTRNN_PERSISTENT_SWITCHES (comma-separated) turns
# on, to bisect a wrong result or a slowdown on a device without editing code.
SWITCHES = {
    "fence_barrier": "FRNN_BARRIER_FENCE",  # fence + atomicAdd instead of red.release
    "scalar_projection": "FRNN_MATVEC_SCALAR",  # one k per lane instead of four
    "ldcg_staging": "FRNN_STAGE_LDCG",  # staging through registers instead of cp.async
    "per_value_reduction": "FRNN_REDUCE_PER_VALUE",  # one 5-shuffle warp sum per projection sum
}


def defines(macros):
    """Source text defining each of ``macros`` (placed before the header)."""
    return "".join(f"#define {m} 1\n" for m in macros)


def switch_defines(value=None):
    """The defines of the switches named in ``value`` (default: the env variable)."""
    if value is None:
        value = os.environ.get("MLX_FASTRNN_PERSISTENT_SWITCHES", "")
    names = [n.strip() for n in value.split(",") if n.strip()]
    return defines(SWITCHES[n] for n in names if n in SWITCHES)


@functools.lru_cache(maxsize=16)
def _with_switches(value, header):
    # The same string object per (switches, header) on every call: a fresh
    # 17 KB concatenation would be rehashed by _source_digest's cache each time.
    return switch_defines(value) + header


# --------------------------------------------------------------------------- sources


def kernel_spec(p, x_dtype, flag, header=HEADER, lens=False, rev=0, interleaved=False, zero_states=0):
    """The kernel for plan ``p``: ``flag`` is the forward's ``ZS`` mask (an int; True:
    h_0 zero) or the backward's NEED_D0, ``zero_states`` the backward's ``ZS`` mask
    (:mod:`.contract`, :func:`flag_template`);
    ``lens`` (per-row lengths) / ``rev`` (bit p: problem p reversed) /
    ``interleaved`` (problem-interleaved x, out, dx, gout: ``XIL``) select the
    varlen body (:mod:`.tiled`, :mod:`.contract`).

    ``header`` replaces the shared device code (the tuning tools prepend the
    ``FRNN_*`` switches documented in ``persistent_header``). Cached: a launch
    pays a lookup, not the ~20 us of assembling the spec."""
    return _kernel_spec(p, x_dtype, int(flag), header, os.environ.get("MLX_FASTRNN_PERSISTENT_SWITCHES", ""),
                        bool(lens), int(rev), bool(interleaved), int(zero_states))


def flag_template(forward, flag, zero_states=0):
    """The template arguments of a kernel's zero initial states (and, backward, whether
    it forms the initial states' cotangents): forward ``ZS`` (``flag``: the zero
    initial states' mask), backward ``NEED_D0`` (``flag``) and ``ZS`` (:mod:`.contract`)."""
    if forward:
        if zero_states:
            raise ValueError("a forward kernel takes its zero states' mask as flag, not zero_states")
        return (("ZS", int(flag)),)
    return (("NEED_D0", bool(flag)), ("ZS", int(zero_states)))


@functools.lru_cache(maxsize=512)
def _kernel_spec(p, x_dtype, flag, header, switches, lens, rev, interleaved, zero_states):
    from . import tiled

    header = _with_switches(switches, header)
    header = _cell_header(header, p.cell, p.CL)
    mod = cell_module(p.cell)
    fwd = p.direction == "forward"
    varlen = bool(lens or rev or interleaved)
    body = tiled.forward_body(p.cell, varlen) if fwd else tiled.backward_body(p.cell, varlen)
    inputs, outputs = tiled.forward_io(p.cell, varlen) if fwd else tiled.backward_io(p.cell, varlen)
    template = (
        ("T", x_dtype),
        ("WT", p.w_dtype),
        ("H", p.H),
        ("U", p.U),
        ("NU", p.NU),
        ("BB", p.BB),
        ("BBP", p.BBP),
        ("RB", p.RB),
        ("NCS", p.NCS),
        ("KS", p.KS),
        ("KCH", p.KCH),
        ("TPB", p.TPB),
        ("EPT", p.EPT),
        ("NBB", p.NBB),
        ("NP", p.NP),
        ("WG", p.w_global),
        ("MMA", p.mma),
        ("WLD", p.wld),
        ("HLD", p.hld),
        ("CLU", bool(p.CL)),
        ("PIPE", p.pipe),
        ("HR", p.hrows),
        *flag_template(fwd, flag, zero_states),
        *((("LENS", bool(lens)), ("REV", int(rev)), ("XIL", bool(interleaved))) if varlen else ()),
        *mod.template_extras(p.cell),
    )
    # MLX caches the compiled module by kernel name, in memory and on disk
    # (its PTX cache): the name must change whenever the source does.
    digest = source_digest(header, body)
    name = f"frnn_{p.cell}_{'fwd' if fwd else 'bwd'}_{digest}_s{p.smem}"
    return KernelSpec(
        name=name,
        input_names=inputs,
        output_names=outputs,
        header=header,
        body=body,
        template=template,
        shared_memory=p.smem,
        grid=(p.nblocks * p.TPB, 1, 1),
        threadgroup=(p.TPB, 1, 1),
    )


# Every tiled kernel is compiled for at most 128 registers a thread
# (``__launch_bounds__(512, 1)``: 65536 registers over 512 threads), so two
# 256-thread blocks fit one SM and two persistent grids that MLX runs concurrently
# (independent nodes of one CUDA graph) are co-resident together, as the
# shared-memory budget already assumes. Without the bound ptxas gave the two-problem
# varlen LSTM forward 147 registers (one block per SM). MLX writes the kernel's
# signature itself (and defines the template values inside the body, so TPB is not
# known there), so the bound comes in through ``__global__``, redefined for the one
# kernel that follows the header (the last thing in the source). 512: the most
# threads the tuning tools launch. A cluster plan (``Plan.CL``) adds the cluster's size
# there too: MLX's cuda_kernel launches without cluster dimensions, so they are the
# kernel's compile-time ``__cluster_dims__`` (tests/test_cuda_clusters.py).
LAUNCH_BOUNDS = """
#undef __global__
#define __global__ __location__(global) __launch_bounds__(512, 1)
"""


def launch_bounds(cluster=0):
    """The ``__global__`` redefinition: the launch bounds, and ``cluster`` blocks a cluster."""
    if not cluster:
        return LAUNCH_BOUNDS
    return LAUNCH_BOUNDS.rstrip("\n") + f" __cluster_dims__({int(cluster)}, 1, 1)\n"


@functools.lru_cache(maxsize=64)
def _cell_header(header, cell, cluster=0):
    # The shared device code, the cell's point functions, the launch bounds (one
    # string object per triple).
    return header + cell_module(cell).POINT + launch_bounds(cluster)


# --------------------------------------------------------------------------- launching


def _shape_ok(a, shape, dtype=mx.float32):
    return a is not None and tuple(a.shape) == tuple(shape) and a.dtype == dtype


def _given_or_selected(use_plan, direction, cell_name, xp, w_h, limits, tpb, weights):
    if use_plan is None:
        return select(direction, cell_name, xp, w_h, limits, tpb, weights)
    dims = _check_common(cell_name, xp, w_h)
    lim = limits if limits is not None else device_limits()
    if dims is None or lim is None:
        return None
    B, H, NP = dims[2], dims[3], dims[4]
    p = use_plan
    if (p.direction, p.cell, p.H, p.B, p.NP) != (direction, cell_name, H, B, NP) or p.nblocks > lim.num_sms:
        raise ValueError(f"plan {p} does not fit this {direction} {cell_name} problem (B={B}, H={H}, NP={NP})")
    if p.CL and (p.NU != p.CL or p.CL > MAX_CLUSTER or lim.cc_major < 9 or not clusters_enabled()):
        raise ValueError(f"cluster plan {p}: needs NU == CL <= {MAX_CLUSTER}, compute capability 9+ and "
                         "tiled_plan.clusters_enabled() (MLX without CUDA graphs)")
    return p


def _problem_params(params, p, H):
    """Per-unit parameters as the kernels read them: [NP*H] (problem-major)."""
    want = (H,) if p.NP == 1 else (p.NP, H)
    if not all(_shape_ok(q, want) for q in params):
        return None
    return tuple(q if p.NP == 1 else q.reshape(p.NP * H) for q in params)


_ZERO_OPERAND = []


def zero_operand():
    """The operand a kernel is given for a zero initial state it never reads
    (:mod:`.contract`'s ZS): a zero state made per call would be a graph node and a
    fill on the GPU. Evaluated once, so no trace (``mx.compile``) holds its fill."""
    if not _ZERO_OPERAND:
        z = mx.zeros((1,), mx.float32)
        mx.eval(z)
        _ZERO_OPERAND.append(z)
    return _ZERO_OPERAND[0]


def zero_states_mask(states0, h0_is_zero=False):
    """The ``ZS`` mask of the initial states given as None (bit 0 also for ``h0_is_zero``)."""
    mask = 1 if h0_is_zero else 0
    for q, s in enumerate(states0):
        if s is None:
            mask |= 1 << q
    return mask


def forward_operands(p, cell_name, xp, w_h, states0, params):
    """``(states0, params, w)`` as a forward kernel of plan ``p`` (either class)
    reads them (a state given as None, zero, by a placeholder), or ``None`` when
    their count or shapes do not match."""
    cs = CELLS[cell_name]
    B, H = xp.shape[1], w_h.shape[-1]  # B: all rows (NP problems)
    states0, params = tuple(states0), tuple(params)
    if len(states0) != cs.num_states or len(params) != cs.num_params:
        return None
    if not all(s is None or _shape_ok(s, (B, H)) for s in states0):
        return None
    params = _problem_params(params, p, H)
    if params is None:
        return None
    return tuple(zero_operand() if s is None else s for s in states0), params, _w_operand(p, w_h)


def backward_operands(p, cell_name, d_outs, xp, hp, prevs, params, w_h):
    """``(d_outs, prevs, params, w)`` as a backward kernel of plan ``p`` (either
    class) reads them (cotangents cast to float32), or ``None`` when they do not match."""
    cs = CELLS[cell_name]
    L, B, H = xp.shape[0], xp.shape[1], w_h.shape[-1]
    d_outs, prevs, params = tuple(d_outs), tuple(prevs), tuple(params)
    if len(d_outs) != cs.num_states or len(prevs) != cs.num_states or len(params) != cs.num_params:
        return None
    params = _problem_params(params, p, H)
    if params is None or tuple(hp.shape) != (L, B, cs.num_gates * H) or hp.dtype != mx.float32:
        return None
    if not all(tuple(a.shape) == (L, B, H) for a in (*d_outs, *prevs)):
        return None
    if not all(a.dtype == mx.float32 for a in prevs):
        return None
    d_outs = tuple(d if d.dtype == mx.float32 else d.astype(mx.float32) for d in d_outs)
    if p.w_global:  # the backward streams W_h's columns: as the rows of W_h^T
        return d_outs, prevs, params, mx.contiguous(_w_operand(p, w_h.swapaxes(-1, -2)))
    return d_outs, prevs, params, _w_operand(p, w_h)


def _w_operand(p, w_h):
    """W_h as plan ``p``'s kernel reads it (its ``w_dtype``)."""
    return w_h if p.w_dtype == mx.float32 else w_h.astype(p.w_dtype)


# The directions of a launch are the bits of one int template argument (bit p:
# problem p reversed), so a varlen launch takes at most 31 problems.
MAX_REVERSIBLE_PROBLEMS = 31


def lengths_operand(lens, rows):
    """The ``lens`` input of a varlen kernel: int32 [rows] (validated by the
    caller: every length in 1..L), or a one-element placeholder without lengths."""
    if lens is None:
        return _NO_LENGTHS
    if tuple(lens.shape) != (rows,):
        raise ValueError(f"lens must have shape ({rows},), got {tuple(lens.shape)}")
    return lens if lens.dtype == mx.int32 else lens.astype(mx.int32)


_NO_LENGTHS = mx.zeros((1,), mx.int32)


def out_cotangent(d_out, shape):
    """The ``gout`` input: ``d_out`` as float32 (zeros when None), or None for a wrong shape."""
    if d_out is None:
        return mx.zeros(shape, mx.float32)
    if tuple(d_out.shape) != tuple(shape):
        return None
    return d_out if d_out.dtype == mx.float32 else d_out.astype(mx.float32)


def is_varlen(lens, rev, interleaved):
    """Whether a launch takes the varlen body: per-row lengths (an array, or None),
    reversed problems (``rev`` bits) or problem-interleaved x / out (:mod:`.contract`)."""
    return lens is not None or bool(rev) or bool(interleaved)


def _directions_fit(p, rev):
    """Whether ``rev`` names only problems of plan ``p`` in the bits a launch has."""
    if not isinstance(rev, int) or rev < 0:
        raise ValueError(f"rev must be a non-negative int bit mask, got {rev!r}")
    return p.NP <= MAX_REVERSIBLE_PROBLEMS and rev < (1 << p.NP)


def forward_arrays(p, xp, w_h, states0, params, lens, rev, sync_words, interleaved=False):
    """``(inputs, output shapes, output dtypes)`` of either class's forward
    (:mod:`.contract`'s I/O; ``sync_words``: the barrier-counter output), or None.
    Outputs: the state sequences, hp, (varlen: out,) the barrier counters."""
    operands = forward_operands(p, p.cell, xp, w_h, states0, params)
    if operands is None:
        return None
    states0, params, w = operands
    cs = CELLS[p.cell]
    L, B, H = xp.shape[0], xp.shape[1], w_h.shape[-1]  # B: all rows (NP problems)
    varlen = is_varlen(lens, rev, interleaved)
    if varlen and not _directions_fit(p, rev):
        return None
    inputs = (xp, w, *states0, *((lengths_operand(lens, B),) if varlen else ()), *params)
    shapes = [(L, B, H)] * cs.num_states + [(L, B, cs.num_gates * H)] + [(L, B, H)] * varlen
    shapes.append((sync_words,))
    dtypes = [mx.float32] * (len(shapes) - 1) + [mx.uint32]
    return inputs, shapes, dtypes


def backward_arrays(p, d_outs, xp, hp, prevs, params, w_h, lens, rev, d_out, sync_words, interleaved=False):
    """As :func:`forward_arrays`, for the backward; ``d_out``: the cotangent of
    the varlen forward's ``out`` (position order)."""
    from .contract import writes_dhp

    operands = backward_operands(p, p.cell, d_outs, xp, hp, prevs, params, w_h)
    if operands is None:
        return None
    d_outs, prevs, params, w = operands
    cs = CELLS[p.cell]
    L, B, H = xp.shape[0], xp.shape[1], w_h.shape[-1]
    varlen = is_varlen(lens, rev, interleaved)
    if varlen:
        if not _directions_fit(p, rev):
            return None
        d_out = out_cotangent(d_out, (L, B, H))
        if d_out is None:
            return None
    inputs = (*d_outs, *((d_out,) if varlen else ()), xp, hp, *prevs, w,
              *((lengths_operand(lens, B),) if varlen else ()), *params)
    shapes = [(L, B, cs.num_gates * H)] * (2 if writes_dhp(p.cell, varlen) else 1) + [(B, H)] * cs.num_states
    shapes.append((sync_words,))
    dtypes = [mx.float32] * (len(shapes) - 1) + [mx.uint32]
    return inputs, shapes, dtypes


def forward_launch(p, xp, w_h, states0, params, h0_is_zero, lens=None, rev=0, header=HEADER, interleaved=False):
    """``(spec, inputs, output shapes, output dtypes)`` of the tiled forward, or None
    (a state given as None is zero, and so is h_0 with ``h0_is_zero``: not read)."""
    arrays = forward_arrays(p, xp, w_h, states0, params, lens, rev, p.sync_words, interleaved)
    if arrays is None:
        return None
    flag = zero_states_mask(states0, h0_is_zero)
    return (kernel_spec(p, xp.dtype, flag, header, lens is not None, rev, interleaved), *arrays)


def backward_launch(p, d_outs, xp, hp, prevs, params, w_h, need_d_state0, lens=None, rev=0, d_out=None,
                    header=HEADER, interleaved=False, zero_states=0):
    """``(spec, inputs, output shapes, output dtypes)`` of the tiled backward, or None.
    ``zero_states`` (``ZS``): bit q set = state q started at zero and ``prevs[q]`` is its
    state sequence (not shifted by a step: :mod:`.contract`)."""
    arrays = backward_arrays(p, d_outs, xp, hp, prevs, params, w_h, lens, rev, d_out, p.sync_words, interleaved)
    if arrays is None:
        return None
    return (kernel_spec(p, xp.dtype, need_d_state0, header, lens is not None, rev, interleaved, zero_states),
            *arrays)


def backward_results(cell, outs, need_d_state0, varlen=False):
    """``(dx, dhp, d_states0)`` from either class's backward outputs (barrier words dropped)."""
    from .contract import writes_dhp

    outs = list(outs[:-1])
    dx = outs.pop(0)
    dhp = outs.pop(0) if writes_dhp(cell, varlen) else dx
    return dx, dhp, (tuple(outs) if need_d_state0 else None)


def persistent_sequence(cell_name, xp, w_h, states0, params, h0_is_zero, *, limits=None, tpb=256,
                        weights="auto", use_plan=None, header=HEADER, lens=None, rev=0, interleaved=False):
    """Run the whole forward recurrence in one kernel.

    Args follow ``ops.sequence.recurrence``: ``xp`` [L, B, G*H] (float32/16,
    bfloat16), ``w_h`` [G*H, H] float32, ``states0`` (each [B, H] float32; one
    given as None is zero), ``params`` (GRU: ``(bhn,)``), ``h0_is_zero`` (h_0 is zero:
    ``states0[0]`` is then never read, whatever it holds); ``lens`` int32 [B] per-row
    lengths (1..L), ``rev`` (bit p: problem p runs from each row's end) and
    ``interleaved`` (``xp`` and ``out`` problem-interleaved): see :mod:`.contract`.

    Returns one float32 [L, B, H] sequence per state, then ``hp`` [L, B, G*H]
    (``hp_t = h_{t-1} W_h^T``, zero at t=0 when ``h0_is_zero``), then with
    ``lens`` / ``rev`` / ``interleaved`` the output ``out`` [L, B, H] in position order; or
    ``None`` when the caller must use the per-step path. ``use_plan`` /
    ``header`` are for tuning (``benchmarks/persistent_tune.py``): a plan from
    :func:`plan` for this problem, and replacement device code.
    """
    if not cuda_available():
        return None
    p = _given_or_selected(use_plan, "forward", cell_name, xp, w_h, limits, tpb, weights)
    if p is None:
        return None
    launch_args = forward_launch(p, xp, w_h, states0, params, h0_is_zero, lens, rev, header, interleaved)
    if launch_args is None:
        return None
    return tuple(launch(*launch_args)[:-1])  # the barrier counters dropped


def persistent_backward(cell_name, d_outs, xp, hp, prevs, params, w_h, need_d_state0, *, limits=None,
                        tpb=256, weights="auto", use_plan=None, header=HEADER, lens=None, rev=0, d_out=None,
                        interleaved=False, zero_states=0):
    """Adjoint of :func:`persistent_sequence` in one reverse-time kernel.

    Same meaning as the cells' ``naive.backward_sequence``: ``d_outs`` the
    cotangents of the state sequences ([L, B, H] each), ``xp`` / ``hp`` the
    forward's step inputs, ``prevs`` the state entering each step ([L, B, H]
    each: ``concat(s0, seq[:-1])``, or under ``zero_states`` bit q the state sequence
    itself, its initial state zero); with ``lens`` / ``rev``, ``d_out`` the
    cotangent of ``out``. Returns ``(dx, dhp, d_states0)`` with ``dx``, ``dhp``
    [L, B, G*H] float32 (``dx`` in position order, ``dhp`` in step order;
    the same array where they coincide) and ``d_states0`` a tuple of [B, H]
    (``None`` unless ``need_d_state0``), or ``None`` for the per-step path. The
    weight gradient stays outside (``dhp^T h_prev``, one matmul).
    """
    if not cuda_available():
        return None
    p = _given_or_selected(use_plan, "backward", cell_name, xp, w_h, limits, tpb, weights)
    if p is None:
        return None
    launch_args = backward_launch(p, d_outs, xp, hp, prevs, params, w_h, need_d_state0, lens, rev, d_out, header,
                                  interleaved, zero_states)
    if launch_args is None:
        return None
    return backward_results(cell_name, launch(*launch_args), need_d_state0, is_varlen(lens, rev, interleaved))
