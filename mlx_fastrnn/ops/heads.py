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
of the dense product's work and weight bytes), and only for a cell with
per-unit params (GRU's ``bhn``) on the fused step kernels, which read them as
one [H] vector, the dense block-diagonal ``W_h`` on the step loop (N times the
recurrent work, the same numbers).
"""

import mlx.core as mx

from ..cells.timeaxis import f32
from ..kernels.classes import Operand
from .sequence import recurrence


def block_diagonal(r):
    """``R [G, N, D, D]`` -> the dense ``[G*N*D, N*D]`` matrix whose gate-g rows
    hold ``R[g, k]`` at head k's columns (zeros elsewhere): the ``W_h`` of the
    cells' gate-major, head-major layout."""
    g, n, d, _ = r.shape
    return mx.einsum("gkij,kl->gkilj", r, mx.eye(n, dtype=r.dtype)).reshape(g * n * d, n * d)


def _launches(steps, xp, gates, heads, dim):
    """The head ranges ``[(lo, hi), ...]`` that each run as one launch of
    problems on the whole-sequence kernels, or ``None`` where they do not."""
    length, batch, _ = xp.shape

    def takes(n):
        return steps.accepts(Operand((length, n * batch, gates * dim), xp.dtype, 3),
                             Operand((n, gates * dim, dim), mx.float32, 3), kind="heads")

    if takes(heads):
        return [(0, heads)]
    half = (heads + 1) // 2
    if takes(half) and takes(heads - half):
        return [(0, half), (half, heads)]
    return None


def _problems(cell, steps, xp, r, states0, params, given, lo, hi):
    """Heads ``lo:hi`` of ``xp`` [L, B, G, N, D] as problems of one ``recurrence``:
    rows head-major ([L, n*B, G*D]), W_h [n, G*D, D]; returns [L, B, n*D] per state."""
    gates, _, dim, _ = r.shape
    length, batch = xp.shape[:2]
    n = hi - lo
    xh = mx.contiguous(xp[:, :, :, lo:hi].transpose(0, 3, 1, 2, 4).reshape(length, n * batch, gates * dim))
    wh = mx.contiguous(f32(r[:, lo:hi]).transpose(1, 0, 2, 3).reshape(n, gates * dim, dim))
    s0 = tuple(mx.contiguous(s[:, lo * dim:hi * dim].reshape(batch, n, dim).swapaxes(0, 1)
                             .reshape(n * batch, dim)) for s in states0)
    prm = tuple(p[lo * dim:hi * dim].reshape(n, dim) for p in params)
    seqs = recurrence(cell, steps, xh, wh, s0, prm, given)
    return tuple(s.reshape(length, n, batch, dim).swapaxes(1, 2).reshape(length, batch, n * dim) for s in seqs)


def head_recurrence(cell, steps, xp, r, states0, params, given):
    """``recurrence`` with ``W_h`` the block-diagonal form of ``r`` [G, N, D, D].

    ``xp`` [L, B, G*N*D] (gate-major, head-major), ``states0`` each [B, N*D],
    ``params`` each [N*D]; returns one [L, B, N*D] float32 sequence per state.
    """
    gates, heads, dim, _ = r.shape
    length, batch, _ = xp.shape
    if heads > 1:
        launches = _launches(steps, xp, gates, heads, dim) if steps.accepts is not None else None
        # else the step loop of problems (one batched matmul per step; a per-step or the
        # CPU's whole-sequence backward), unless the dense W_h takes a kernel (its
        # stand-in: shapes are all the planner reads)
        loop_takes = (not params or steps.row_params) and (
            steps.backward_step is not None or steps.backward_sequence is not None)
        if launches is None and loop_takes and not (
                steps.accepts is not None
                and steps.accepts(xp, Operand((gates * heads * dim, heads * dim), mx.float32, 2))):
            launches = [(0, heads)]
        if launches is not None:
            xg = xp.reshape(length, batch, gates, heads, dim)
            parts = [_problems(cell, steps, xg, r, states0, params, given, lo, hi) for lo, hi in launches]
            if len(parts) == 1:
                return parts[0]
            return tuple(mx.concatenate(seqs, axis=-1) for seqs in zip(*parts))
    return recurrence(cell, steps, xp, block_diagonal(f32(r)), states0, params, given)
