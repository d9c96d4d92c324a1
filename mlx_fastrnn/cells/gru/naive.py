"""GRU step in plain MLX ops: the reference every GRU kernel is tested against.

Shapes (any leading batch axes ``...``; ``H`` hidden size):
  x   [..., 3H]  input pre-activations ``x W_x^T + b`` in gate order r, z, n (any float dtype)
  hp  [..., 3H]  recurrent projection ``h W_h^T`` (float32)
  h   [..., H]   previous hidden state (float32)
  bhn [H]        hidden bias of the candidate gate (float32; zeros when bias=False)

    r = sigmoid(x_r + hp_r)          z = sigmoid(x_z + hp_z)
    n = tanh(x_n + r * (hp_n + bhn)) h' = (1 - z) * n + z * h
"""

import mlx.core as mx

from ..timeaxis import f32, per_problem_matmul, split_time


def _gates(x, hp, bhn):
    xr, xz, xn = mx.split(f32(x), 3, axis=-1)
    hr, hz, hn = mx.split(hp, 3, axis=-1)
    r, z, hn = mx.sigmoid(xr + hr), mx.sigmoid(xz + hz), hn + bhn
    n = mx.tanh(xn + r * hn)
    return r, z, n, hn


def forward_step(x, hp, states, params):
    """One time step. ``states = (h,)``, ``params = (bhn,)``; returns ``(h',)``."""
    (h,), (bhn,) = states, params
    _, z, n, _ = _gates(x, hp, bhn)
    return ((1 - z) * n + z * h,)


def backward_step(d_out, d_rec, x, hp, states, params):
    """Adjoint of :func:`forward_step`, recomputing the gates from ``x`` and ``hp``.

    ``d_out`` is the cotangent of this step's output ``(h',)``, ``d_rec`` the one
    flowing back from step t+1. Returns ``(dx, dhp, direct)``: the cotangents of
    ``x`` and ``hp`` (they differ only in the n block, where ``hp`` is scaled by
    ``r``) and ``(dh_direct,)``, the part of ``dh`` that does not pass through
    ``hp``: ``dh = dh_direct + dhp @ W_h``.
    """
    (h,), (bhn,) = states, params
    r, z, n, hn = _gates(x, hp, bhn)
    dh = d_out[0] + d_rec[0]
    dn = dh * (1 - z) * (1 - n * n)
    dz = dh * (h - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    dx = mx.concatenate([dr, dz, dn], axis=-1)
    dhp = mx.concatenate([dr, dz, dn * r], axis=-1)
    return dx, dhp, (dh * z,)


def backward_sequence(d_outs, x, hp, prevs, params, w_h, need_d_state0):
    """Adjoint of the whole sequence, the CPU way: everything but the serial
    recurrence runs vectorized over time.

    The cotangents of the gates are linear in ``g_t`` (the total cotangent of
    h_t) with coefficients that depend only on the forward pass, so they are
    computed for all t at once; the loop then only carries
    ``g_{t-1} = d_out_{t-1} + g_t z_t + (g_t * coef_t) @ W_h``.

    Args are time-major [L, B, ...]: ``d_outs = (dh_seq,)``, ``x``/``hp`` the
    step inputs, ``prevs = (h_{t-1} seq,)``. Returns ``(dx, dhp, d_states0)``,
    with ``d_states0 = None`` unless ``need_d_state0``.
    """
    (bhn,), (h,), (d_h,) = params, prevs, d_outs
    length, batch, hidden = h.shape
    r, z, n, hn = _gates(x, hp, bhn)
    a_n = (1 - z) * (1 - n * n)
    coef = mx.stack([a_n * hn * r * (1 - r), (h - n) * z * (1 - z), a_n * r], axis=-2)
    coefs, zs, d_hs = split_time(coef), split_time(z), split_time(d_h)
    gs = [None] * length
    g = d_hs[-1]
    for t in reversed(range(length)):
        gs[t] = g
        if t == 0 and not need_d_state0:
            break
        dhp_t = (g[:, None, :] * coefs[t]).reshape(batch, 3 * hidden)
        # a stacked [NP, 3H, H] W_h (problems): each problem's rows by its own
        rec = mx.addmm(g * zs[t], dhp_t, w_h) if w_h.ndim == 2 else g * zs[t] + per_problem_matmul(dhp_t, w_h)
        g = rec if t == 0 else d_hs[t - 1] + rec
    g = mx.concatenate(gs, axis=0).reshape(length, batch, 1, hidden)
    dhp = (g * coef).reshape(length, batch, 3 * hidden)
    dx = mx.concatenate([dhp[..., : 2 * hidden], g[..., 0, :] * a_n], axis=-1)
    return dx, dhp, ((rec,) if need_d_state0 else None)

