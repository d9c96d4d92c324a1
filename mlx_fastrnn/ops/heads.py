"""Multi-head recurrences: N independent heads of size D, block-diagonal R.

``head_recurrence`` runs the heads as N independent problems (each head its
own W_h block; rows head-major): on the whole-sequence kernels where they take
them (each head its own blocks of the grid, no synchronisation between heads),
else as the dense block-diagonal ``W_h`` where a whole-sequence kernel takes
that, else on the per-step cells with one batched matmul per step (each head's
rows by its own block: 1/N of the dense product's work and weight bytes), and
only for a cell with per-unit params (GRU's ``bhn``, which the step kernels
read as one [H] vector) or without per-step backward kernels (the CPU) the
dense block-diagonal ``W_h`` on the per-step path (N times the recurrent work,
the same numbers).
"""

import mlx.core as mx

from ..cells.timeaxis import f32
from .sequence import recurrence


def block_diagonal(r):
    """``R [G, N, D, D]`` -> the dense ``[G*N*D, N*D]`` matrix whose gate-g rows
    hold ``R[g, k]`` at head k's columns (zeros elsewhere): the ``W_h`` of the
    cells' gate-major, head-major layout."""
    g, n, d, _ = r.shape
    return mx.einsum("gkij,kl->gkilj", r, mx.eye(n, dtype=r.dtype)).reshape(g * n * d, n * d)


def head_recurrence(cell, steps, xp, r, states0, params, given):
    """``recurrence`` with ``W_h`` the block-diagonal form of ``r`` [G, N, D, D].

    ``xp`` [L, B, G*N*D] (gate-major, head-major), ``states0`` each [B, N*D],
    ``params`` each [N*D]; returns one [L, B, N*D] float32 sequence per state.
    """
    gates, heads, dim, _ = r.shape
    length, batch, _ = xp.shape
    if heads > 1 and steps.accepts is not None:
        # Heads as problems: rows head-major ([L, N*B, G*D]), W_h [N, G*D, D].
        xh = mx.contiguous(xp.reshape(length, batch, gates, heads, dim).transpose(0, 3, 1, 2, 4)
                           .reshape(length, heads * batch, gates * dim))
        wh = mx.contiguous(f32(r).transpose(1, 0, 2, 3).reshape(heads, gates * dim, dim))
        # else the per-step loop of problems, unless the dense W_h takes a kernel (its
        # stand-in: shapes are all the planner reads)
        if steps.accepts(xh, wh, kind="heads") or (
                not params and steps.backward_step is not None
                and not steps.accepts(xp, mx.zeros((gates * heads * dim, heads * dim)))):
            s0 = tuple(mx.contiguous(s.reshape(batch, heads, dim).swapaxes(0, 1).reshape(heads * batch, dim))
                       for s in states0)
            prm = tuple(p.reshape(heads, dim) for p in params)
            seqs = recurrence(cell, steps, xh, wh, s0, prm, given)
            return tuple(s.reshape(length, heads, batch, dim).swapaxes(1, 2).reshape(length, batch, heads * dim)
                         for s in seqs)
    return recurrence(cell, steps, xp, block_diagonal(f32(r)), states0, params, given)
