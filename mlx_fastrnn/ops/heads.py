"""Multi-head recurrences: N independent heads of size D, block-diagonal R.

``head_recurrence`` runs the heads as independent problems (each head its own
W_h block; rows head-major): on the whole-sequence kernels where they take
them (each head its own blocks of the grid, no synchronisation between heads),
all heads in one launch or, where one grid cannot hold them all, the two
halves of the heads in two launches (at most two: the shared-memory budget
lets exactly two persistent grids be co-resident, as for the two directions of
a bidirectional layer); else as the dense block-diagonal ``W_h`` where a
whole-sequence kernel takes that, else (and on Metal and the CPU) on the step
loop with one batched matmul per step (each head's rows by its own block: 1/N
of the dense product's work and weight bytes; per-head params such as GRU's
``bhn`` as one row per batch row).
"""

import mlx.core as mx

from ..cells.timeaxis import f32
from ..kernels import classes
from ..kernels.classes import Operand
from .sequence import recurrence


def block_diagonal(r):
    """``R [G, N, D, D]`` -> the dense ``[G*N*D, N*D]`` matrix whose gate-g rows
    hold ``R[g, k]`` at head k's columns (zeros elsewhere): the ``W_h`` of the
    cells' gate-major, head-major layout."""
    g, n, d, _ = r.shape
    if n == 1:  # one head: R itself (no einsum, which is a kernel launch and a VJP more)
        return r.reshape(g * d, d)
    return mx.einsum("gkij,kl->gkilj", r, mx.eye(n, dtype=r.dtype)).reshape(g * n * d, n * d)


def _launches(steps, xp, gates, heads, dim):
    """The head ranges ``[(lo, hi), ...]`` that each run as one launch of
    problems on the whole-sequence kernels, or ``None`` where they do not.

    First launches whose forward and backward both run on the kernels: all heads,
    else the two halves (16 sLSTM heads of 128 at B = 64 on the H200, 2026-12-04:
    42 ms forward+backward in two such launches, 99-135 in one launch whose backward
    ran the step loop). Else launches whose forward alone runs on the kernels (the
    backward: the step loop of problems, one per launch), all heads or the halves:
    16 sLSTM heads of 256 at B = 64, bfloat16, T = 1024, took 32 ms forward and 426
    forward+backward in two such launches, 125 and 478 on the step loop both ways
    (two leases of that day, two H200s)."""
    length, batch, _ = xp.shape

    def takes(n, forward_only=False):
        return steps.accepts(Operand((length, n * batch, gates * dim), xp.dtype, 3),
                             Operand((n, gates * dim, dim), mx.float32, 3), kind="heads",
                             **({"forward_only": True} if forward_only else {}))

    half = (heads + 1) // 2
    for forward_only in (False, True):
        if takes(heads, forward_only):
            return [(0, heads)]
        if takes(half, forward_only) and takes(heads - half, forward_only):
            return [(0, half), (half, heads)]
    return None


def forward_class(cell, steps, length, batch, gates, heads, dim, dtype):
    """The whole-sequence kernel class (``"tiled"`` / ``"resident"``) that
    ``head_recurrence``'s forward launch(es) would run on with pre-activations of
    ``dtype``, or ``None`` (no whole-sequence kernel: the step loop, the dense
    block-diagonal form; Metal, the CPU)."""
    if steps.accepts is None:
        return None
    if heads == 1:
        xp, w = Operand((length, batch, gates * dim), dtype, 3), Operand((gates * dim, dim), mx.float32, 2)
    else:
        launches = _launches(steps, Operand((length, batch, gates * heads * dim), dtype, 3), gates, heads, dim)
        if launches is None:
            return None
        n = launches[0][1] - launches[0][0]
        xp, w = Operand((length, n * batch, gates * dim), dtype, 3), Operand((n, gates * dim, dim), mx.float32, 3)
    return classes.choose("forward", cell.name, xp, w)[0]


def _problems(cell, steps, xs, r, states0, params, given, lo, hi):
    """Heads ``lo:hi`` as problems of one ``recurrence``: ``xs`` their rows head-major
    [L, n*B, G*D], W_h [n, G*D, D]; returns [L, n, B, D] per state (a view of the
    kernels' rows)."""
    gates, _, dim, _ = r.shape
    length = xs.shape[0]
    n = hi - lo
    batch = xs.shape[1] // n
    wh = mx.contiguous(f32(r[:, lo:hi]).transpose(1, 0, 2, 3).reshape(n, gates * dim, dim))
    # a state not given is zero: no array (ops.sequence.recurrence), not a reordered copy
    s0 = tuple(mx.contiguous(s[:, lo * dim:hi * dim].reshape(batch, n, dim).swapaxes(0, 1)
                             .reshape(n * batch, dim)) if g else None for s, g in zip(states0, given))
    prm = tuple(p[lo * dim:hi * dim].reshape(n, dim) for p in params)
    seqs = recurrence(cell, steps, xs, wh, s0, prm, given)
    return tuple(s.reshape(length, n, batch, dim) for s in seqs)


def head_recurrence(cell, steps, xp, r, states0, params, given, head_major=False):
    """``recurrence`` with ``W_h`` the block-diagonal form of ``r`` [G, N, D, D].

    ``xp`` [L, B, G*N*D] (gate-major, head-major), ``states0`` each [B, N*D],
    ``params`` each [N*D]; returns one [L, B, N*D] float32 sequence per state.
    ``head_major``: ``xp`` is [L, N, B, G*D] instead and the sequences come back
    [L, N, B, D] (the kernels' own row order: a caller that lays its data out so,
    e.g. ``flashrnn``, saves a transposed copy of the inputs and of every output).
    """
    gates, heads, dim, _ = r.shape
    if head_major:
        length, _, batch, _ = xp.shape
    else:
        length, batch, _ = xp.shape
    if heads > 1:
        flat = _flat(xp, gates, heads, dim) if head_major else xp
        launches = _launches(steps, flat, gates, heads, dim) if steps.accepts is not None else None
        # else the step loop of problems (one batched matmul per step; a per-step or the
        # CPU's whole-sequence backward), unless the dense W_h takes a kernel (its
        # stand-in: shapes are all the planner reads)
        loop_takes = steps.backward_step is not None or steps.backward_sequence is not None
        if launches is None and loop_takes and not (
                steps.accepts is not None
                and steps.accepts(flat, Operand((gates * heads * dim, heads * dim), mx.float32, 2))):
            launches = [(0, heads)]
        if launches is not None:
            if head_major:  # all heads: a view; a part: one copy of its rows
                def rows(lo, hi):
                    return (xp if hi - lo == heads else xp[:, lo:hi]).reshape(length, (hi - lo) * batch,
                                                                              gates * dim)
            else:
                xg = xp.reshape(length, batch, gates, heads, dim)

                def rows(lo, hi):
                    return mx.contiguous(xg[:, :, :, lo:hi].transpose(0, 3, 1, 2, 4)).reshape(
                        length, (hi - lo) * batch, gates * dim)
            parts = [_problems(cell, steps, rows(lo, hi), r, states0, params, given, lo, hi)
                     for lo, hi in launches]
            seqs = parts[0] if len(parts) == 1 else tuple(mx.concatenate(q, axis=1) for q in zip(*parts))
            if head_major:
                return seqs
            return tuple(s.swapaxes(1, 2).reshape(length, batch, heads * dim) for s in seqs)
    if head_major and heads == 1:  # [L, 1, B, G*D] is already [L, B, G*D]
        xp = xp.reshape(length, batch, gates * dim)
    elif head_major:
        xp = mx.contiguous(xp.reshape(length, heads, batch, gates, dim).transpose(0, 2, 3, 1, 4)).reshape(
            length, batch, gates * heads * dim)
    seqs = recurrence(cell, steps, xp, block_diagonal(f32(r)), states0, params, given)
    if head_major:
        return tuple(s.reshape(length, batch, heads, dim).swapaxes(1, 2) for s in seqs)
    return seqs


def _flat(xh, gates, heads, dim):
    """A stand-in of the gate-major [L, B, G*N*D] operand of head-major ``xh`` (the
    planner reads only shapes and the dtype)."""
    length, _, batch, _ = xh.shape
    return Operand((length, batch, gates * heads * dim), xh.dtype, 3)
