"""LSTM step in plain MLX ops: the reference every LSTM kernel is tested against.

Shapes (any leading batch axes ``...``; ``H`` hidden size):
  x   [..., 4H]  input pre-activations ``x W_x^T + b`` in gate order i, f, g, o (any float dtype)
  hp  [..., 4H]  recurrent projection ``h W_h^T`` (float32)
  h,c [..., H]   previous hidden and cell state (float32)

    i, f, o = sigmoid(x + hp)[i, f, o blocks]   g = tanh(x_g + hp_g)
    c' = f * c + i * g                          h' = o * tanh(c')
"""

import mlx.core as mx

from ..timeaxis import f32, per_problem_matmul, split_time


def _gates(x, hp):
    i, f, g, o = mx.split(f32(x) + hp, 4, axis=-1)
    return mx.sigmoid(i), mx.sigmoid(f), mx.tanh(g), mx.sigmoid(o)


def forward_step(x, hp, states, params):
    """One time step. ``states = (h, c)``, ``params = ()``; returns ``(h', c')``."""
    _, c = states
    i, f, g, o = _gates(x, hp)
    c = f * c + i * g
    return o * mx.tanh(c), c


def backward_step(d_out, d_rec, x, hp, states, params):
    """Adjoint of :func:`forward_step`, recomputing gates and ``c'``.

    ``d_out = (dh', dc')`` from this step's outputs, ``d_rec`` from step t+1.
    Returns ``(dx, dhp, direct)`` with ``dx == dhp`` (the gate pre-activations)
    and ``direct = (None, dc)``: h reaches the previous step only through
    ``hp`` (``dh = dhp @ W_h``), c directly.
    """
    _, c = states
    i, f, g, o = _gates(x, hp)
    dh = d_out[0] + d_rec[0]
    tc = mx.tanh(f * c + i * g)
    dc = d_out[1] + d_rec[1] + dh * o * (1 - tc * tc)
    dgates = mx.concatenate(
        [
            dc * g * i * (1 - i),
            dc * c * f * (1 - f),
            dc * i * (1 - g * g),
            dh * tc * o * (1 - o),
        ],
        axis=-1,
    )
    return dgates, dgates, (None, dc * f)


def backward_sequence(d_outs, x, hp, prevs, params, w_h, need_d_state0):
    """Adjoint of the whole sequence, the CPU way (see gru.naive.backward_sequence).

    Gate cotangents are ``dc_t * coef_c`` (i, f, g) and ``dh_t * coef_o`` (o),
    with coefficients computed for all t at once; the loop carries
    ``dh_{t-1} = d_out + dpre_t @ W_h`` and ``dc_{t-1} = d_out + dc_t f_t + dh_{t-1} k_{t-1}``.
    """
    (_, c), (d_h, d_c) = prevs, d_outs
    length, batch, hidden = c.shape
    i, f, g, o = _gates(x, hp)
    tc = mx.tanh(f * c + i * g)
    k = o * (1 - tc * tc)
    coef_c = mx.stack([g * i * (1 - i), c * f * (1 - f), i * (1 - g * g)], axis=-2)
    coef_o = tc * o * (1 - o)
    ks, cs, os_, fs = split_time(k), split_time(coef_c), split_time(coef_o), split_time(f)
    d_hs, d_cs = split_time(d_h), split_time(d_c)
    ghs, gcs = [None] * length, [None] * length
    gh, rec_c = d_hs[-1], None
    for t in reversed(range(length)):
        gc = d_cs[t] + gh * ks[t]
        if rec_c is not None:
            gc = gc + rec_c
        ghs[t], gcs[t] = gh, gc
        if t == 0 and not need_d_state0:
            break
        dpre = mx.concatenate(
            [(gc[:, None, :] * cs[t]).reshape(batch, 3 * hidden), gh * os_[t]], axis=-1
        )
        rec_h, rec_c = per_problem_matmul(dpre, w_h), gc * fs[t]
        gh = rec_h if t == 0 else d_hs[t - 1] + rec_h
    gh = mx.concatenate(ghs, axis=0).reshape(length, batch, hidden)
    gc = mx.concatenate(gcs, axis=0).reshape(length, batch, 1, hidden)
    dpre = mx.concatenate(
        [(gc * coef_c).reshape(length, batch, 3 * hidden), gh * coef_o], axis=-1
    )
    return dpre, dpre, ((rec_h, rec_c) if need_d_state0 else None)
