"""Which whole-sequence kernel class runs a launch.

Two classes share one driver contract (``ops/sequence.py``):

* ``resident`` (:mod:`.resident`): one block holds a problem's whole W_h and
  runs a few batch rows through the whole sequence alone (no grid barrier);
  only where W_h fits one block's shared memory.
* ``tiled`` (:mod:`.persistent`): W_h split over a co-resident grid, a
  barrier per step; up to the grid's total shared memory.

``MLX_FASTRNN_KERNEL_CLASS`` = ``resident`` / ``tiled`` forces one (where it
takes the problem; the other is the fallback); by default the measured table
``SELECTION`` (``benchmarks/kernel_classes_tune.py --write-table`` writes it) decides,
and where it has no entry for the cell and direction the resident class runs
whenever it fits. Both classes take per-row lengths and per-problem
directions (``lens`` / ``rev``: :mod:`.contract`).
"""

import functools
import math
import os
from typing import NamedTuple

from . import persistent as P
from . import resident as R

# (cell, direction, dtype name) -> [(B, H, class, rows per block, rows per thread[, threads
# per unit splitting the resident projection's K, when more than one])],
# measured by benchmarks/kernel_classes_tune.py on the device (class_table.py);
# a shape takes the choice of the nearest point in (log B, log H).
try:
    from .class_table import SELECTION
except ImportError:  # no table measured yet
    SELECTION = {}


def _forced():
    value = os.environ.get("MLX_FASTRNN_KERNEL_CLASS", "").strip().lower()
    return value if value in ("resident", "tiled") else None


def table_point(cell, direction, dtype, B, H):
    """The measured point nearest to (B, H) in (log B, log H): ``(B, H, class,
    rows per block, rows per thread)``, or ``None`` without a table entry."""
    points = SELECTION.get((cell, direction, str(dtype).split(".")[-1]))
    if not points:
        return None
    lb, lh = math.log2(B), math.log2(H)
    return min(points, key=lambda q: (math.log2(q[0]) - lb) ** 2 + (math.log2(q[1]) - lh) ** 2)


class Operand(NamedTuple):
    """What planning reads of an array: its shape, dtype and rank (also a stand-in
    for an array not built yet, e.g. ``ops.heads`` asking about a launch)."""

    shape: tuple
    dtype: object
    ndim: int


# Everything besides the operands' shapes and dtypes that a class choice depends on.
_ENV = ("MLX_FASTRNN_KERNEL_CLASS", "MLX_FASTRNN_PERSISTENT", "MLX_FASTRNN_PERSISTENT_SMEM",
        "MLX_FASTRNN_PERSISTENT_BLOCKS", "MLX_FASTRNN_PERSISTENT_STREAMED", "MLX_FASTRNN_PERSISTENT_COLSPLIT",
        "MLX_FASTRNN_PERSISTENT_MMA", "MLX_ENABLE_TF32", "MLX_FASTRNN_RESIDENT_WREG",
        "MLX_FASTRNN_PERSISTENT_EPT_FALLBACK", "MLX_FASTRNN_PERSISTENT_CLUSTER", "MLX_USE_CUDA_GRAPHS",
        "MLX_FASTRNN_PERSISTENT_MMA_FIT", "MLX_FASTRNN_PERSISTENT_PIPELINE", "MLX_FASTRNN_PERSISTENT_HALF_ROWS")


# os.environ's own mapping and the encoded names, read directly for the cache keys:
# tuple(os.environ.get(k) for k in _ENV) took 8.6 us (each .get encodes its key), this
# 0.5 us, and a layer call builds several keys (CPU, CPython 3.12). os.environ keeps
# _data current (setenv / monkeypatch included); without it, the public reads.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEYS = tuple(os.environ.encodekey(k) for k in (*_ENV, "MLX_FASTRNN_PERSISTENT_PROBLEMS"))
except AttributeError:  # not CPython's os._Environ
    _ENV_DATA = None


def _env_key():
    """The values of ``_ENV`` and ``MLX_FASTRNN_PERSISTENT_PROBLEMS`` (a cache key)."""
    if _ENV_DATA is not None:
        return tuple(map(_ENV_DATA.get, _ENV_KEYS))
    return tuple(os.environ.get(k) for k in (*_ENV, "MLX_FASTRNN_PERSISTENT_PROBLEMS"))


def kernel_choice_key():
    """What a launch depends on besides shapes and dtypes: the class choice's environment
    and table, and the kernel-source switches (``MLX_FASTRNN_PERSISTENT_SWITCHES``): a
    cache key for anything that freezes these, e.g. a compiled layer op's trace."""
    return id(SELECTION), _env_key(), os.environ.get("MLX_FASTRNN_PERSISTENT_SWITCHES")


def choose(direction, cell_name, xp, w_h, varlen=False):
    """``("resident", plan)``, ``("tiled", plan)`` or ``(None, None)``; ``varlen``:
    with per-row lengths or reversed problems. Cached per shapes, dtypes, device
    and environment: a layer call pays a dictionary lookup, not the planning
    (which took ~60 us of Python per launch)."""
    return _choose(direction, cell_name, Operand(tuple(xp.shape), xp.dtype, xp.ndim),
                   Operand(tuple(w_h.shape), w_h.dtype, w_h.ndim), bool(varlen), P.device_limits(),
                   id(SELECTION), _env_key())


@functools.lru_cache(maxsize=1024)
def _choose(direction, cell_name, xp, w_h, varlen, limits, selection, env):
    klass, p = _choose_plan(direction, cell_name, xp, w_h, varlen, limits)
    return klass, (R.with_registers(p, limits) if klass == "resident" else p)


def _choose_plan(direction, cell_name, xp, w_h, varlen, limits):
    dims = P._check_common(cell_name, xp, w_h)
    if dims is None:
        return None, None
    _, _, B, H, NP = dims
    if varlen and NP > P.MAX_REVERSIBLE_PROBLEMS:
        return None, None
    rp = R.select(direction, cell_name, xp, w_h, limits)
    forced = _forced()
    if rp is not None and forced != "tiled":
        point = table_point(cell_name, direction, xp.dtype, B, H)
        want = forced or (point[2] if point else "resident")
        if want == "resident":
            if point and point[2] == "resident":
                ksp = point[5] if len(point) > 5 else 1
                tuned = R.plan(direction, cell_name, H, B, limits, xp.dtype, NP, min(point[3], B), point[4],
                               ksp=ksp)
                measured = -(-point[0] // point[3])  # the blocks of the table point's own launch
                rp = _one_block_per_sm(tuned, measured, direction, cell_name, H, B, limits, xp.dtype, NP) or rp
            return "resident", rp
    tp = P.select(direction, cell_name, xp, w_h, limits)
    if tp is not None:
        return "tiled", tp
    return ("resident", rp) if rp is not None else (None, None)


def _one_block_per_sm(tuned, measured, direction, cell_name, H, B, limits, dtype, NP):
    """The table's resident plan, or, where it gives the launch more blocks than SMs
    and than the table point's own (one-problem) launch had (``measured``), the fewest
    rows per block that fit one block per SM (threads per row by the model). The table
    is measured on one problem; a resident block runs the whole sequence, so surplus
    blocks share SMs or wait for a second wave: 16 heads of 64 at B = 64 at the table's
    rows per block (512-1024 blocks) took 2.7x one head's time per step on the H200
    (2026-12-04). Where the table itself measured more blocks than SMs (e.g. B = 256,
    one row per block) its point stands. The table's rows per thread where the block's
    threads and registers allow (``resident_plan.registers_fit``: a larger block leaves
    each thread fewer), else the model's; unchanged where no larger block fits. No K-split
    in the larger block: the table's splits were measured on blocks of one or two rows,
    whose threads idle without them; at 8 rows a block, 16 heads of 64 at B = 64 ran
    0.66-0.77x as fast with the table's split of 2-4 as without (H200, 2026-12-04)."""
    if tuned is None or tuned.nblocks <= max(limits.num_sms, measured):
        return tuned
    for rows in R.ROWS_PER_BLOCK:
        if tuned.BB < rows <= B and -(-B // rows) * NP <= limits.num_sms:
            kept = R.plan(direction, cell_name, H, B, limits, dtype, NP, rows, tuned.RPT)
            if kept is not None and R.registers_fit(kept, limits):
                return kept
            # the model's rows per thread where its registers fit the block, else the table's
            model = R.plan(direction, cell_name, H, B, limits, dtype, NP, rows)
            return model if model is not None and R.registers_fit(model, limits) else kept or model or tuned
    return tuned


def sequence(cell_name, xp, w_h, states0, params, h0_is_zero, lens=None, rev=0, interleaved=False):
    """``persistent.persistent_sequence``'s contract, on the chosen class."""
    if not P.cuda_available():
        return None
    varlen = P.is_varlen(lens, rev, interleaved)
    klass, p = choose("forward", cell_name, xp, w_h, varlen)
    if klass == "resident":
        return R.run_forward(p, xp, w_h, states0, params, h0_is_zero, lens, rev, interleaved)
    if klass == "tiled":
        return P.persistent_sequence(cell_name, xp, w_h, states0, params, h0_is_zero, use_plan=p,
                                     lens=lens, rev=rev, interleaved=interleaved)
    return None


def backward(cell_name, d_outs, xp, hp, prevs, params, w_h, need_d_state0, lens=None, rev=0, d_out=None,
             interleaved=False, zero_states=0):
    """``persistent.persistent_backward``'s contract, on the chosen class."""
    if not P.cuda_available():
        return None
    varlen = P.is_varlen(lens, rev, interleaved)
    klass, p = choose("backward", cell_name, xp, w_h, varlen)
    if klass == "resident":
        return R.run_backward(p, d_outs, xp, hp, prevs, params, w_h, need_d_state0, lens, rev, d_out, interleaved,
                              zero_states)
    if klass == "tiled":
        return P.persistent_backward(cell_name, d_outs, xp, hp, prevs, params, w_h, need_d_state0,
                                     use_plan=p, lens=lens, rev=rev, d_out=d_out, interleaved=interleaved,
                                     zero_states=zero_states)
    return None


# One launch of a bidirectional layer's two directions instead of two concurrent ones
# saves a launch's fixed cost but gives each direction half the blocks; it pays where
# the whole sequence's extra per-step cost (the planner's model, cycles per step, NP=2
# against NP=1, times L) stays under what a launch costs. Taken from the H200
# (2026-12-03, 2-layer bidirectional float32): the one launch won at 32x40x200 (model:
# ~0.07M extra cycles over the sequence forward) and 1x256x256 (~0.06M) and lost ~25%
# at 16x1024x512 (~8.7M); one launch of those short shapes took 0.3-0.5 ms of which the
# kernels' steps were ~0.1 ms (git history of benchmarks/RESULTS.md). ~0.15 ms at ~1.7 GHz:
LAUNCH_COST_CYCLES = 250_000


def _one_launch_pays(cell_name, xp, w_h, limits):
    """Whether two stacked directions (tiled class) beat a launch per direction,
    forward and backward, by :data:`LAUNCH_COST_CYCLES`."""
    dims = P._check_common(cell_name, xp, w_h)
    if dims is None or limits is None:
        return False
    _, L, B, H, NP = dims
    for direction in ("forward", "backward"):
        both = P.plan(direction, cell_name, H, B, limits, x_dtype=xp.dtype, problems=NP)
        one = P.plan(direction, cell_name, H, B, limits, x_dtype=xp.dtype)
        if both is None or one is None or L * (both.cost - one.cost) > LAUNCH_COST_CYCLES:
            return False
    return True


def accepts(cell_name, xp, w_h, varlen=False, kind="directions", forward_only=False):
    """Whether the forward and the backward of this launch both run on a
    whole-sequence kernel (``forward_only``, for ``"heads"`` without ``varlen``:
    whether the forward does; a backward no kernel takes then runs ``recurrence``'s
    step loop of problems, e.g. the sLSTM's, whose backward holds fewer elements per
    thread): NP stacked problems when ``w_h`` is [NP, G*H, H]
    (the resident class always may: its blocks never wait on each other; the
    tiled class as ``tiled_select.multi_problem_enabled`` says for this ``kind``
    of problems, ``"heads"`` or ``"directions"``, and for directions by default
    only where one launch pays over ``xp``'s length L: pass the real L), and
    with ``varlen`` per-row lengths / reversed problems. Cached as ``choose``."""
    if forward_only and (kind != "heads" or varlen):
        raise ValueError("forward_only: heads without lengths only (a backward kernel is needed otherwise)")
    if not P.cuda_available():
        return False
    return _accepts(cell_name, Operand(tuple(xp.shape), xp.dtype, xp.ndim),
                    Operand(tuple(w_h.shape), w_h.dtype, w_h.ndim), bool(varlen), kind, bool(forward_only),
                    P.device_limits(), id(SELECTION), _env_key())


@functools.lru_cache(maxsize=1024)
def _accepts(cell_name, xp, w_h, varlen, kind, forward_only, limits, selection, env):
    problems_env = env[-1]  # MLX_FASTRNN_PERSISTENT_PROBLEMS (str or bytes, or None)
    for direction in ("forward",) if forward_only else ("forward", "backward"):
        klass, _ = _choose(direction, cell_name, xp, w_h, varlen, limits, selection, env)
        if klass is None:
            return False
        if klass == "tiled" and w_h.ndim == 3:
            if not P.multi_problem_enabled(kind):
                return False
            if kind == "directions" and not (problems_env and problems_env.strip()) and not _one_launch_pays(
                    cell_name, xp, w_h, limits):
                return False
    return True
