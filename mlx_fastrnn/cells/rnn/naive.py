"""Elman RNN step in plain MLX ops: the reference every RNN kernel is tested against.

Shapes: x [..., H] input pre-activations ``x W_xh^T + bias`` (any float dtype),
hp [..., H] recurrent projection ``h W_hh^T`` (float32), h [..., H] (float32).

    h' = act(x + hp)      act = tanh or relu
"""

import mlx.core as mx

from ..timeaxis import f32, per_problem_matmul, split_time


def forward_step(x, hp, states, params, relu=False):
    """One time step. ``states = (h,)``, ``params = ()``; returns ``(h',)``."""
    pre = f32(x) + hp
    return (mx.maximum(pre, 0.0) if relu else mx.tanh(pre),)


def backward_step(d_out, d_rec, x, hp, states, params, relu=False):
    """Adjoint of :func:`forward_step`; returns ``(dpre, dpre, (None,))``."""
    pre = f32(x) + hp
    dh = d_out[0] + d_rec[0]
    if relu:
        dpre = mx.where(pre > 0, dh, 0.0)
    else:
        t = mx.tanh(pre)
        dpre = dh * (1 - t * t)
    return dpre, dpre, (None,)


def backward_sequence(d_outs, x, hp, prevs, params, w_h, need_d_state0, relu=False):
    """Adjoint of the whole sequence, the CPU way: the activation's derivative
    for all t at once, then ``g_{t-1} = d_out_{t-1} + (g_t * act'_t) @ W_h``."""
    (d_h,) = d_outs
    length = d_h.shape[0]
    pre = f32(x) + hp
    if relu:
        deriv = (pre > 0).astype(mx.float32)
    else:
        act = mx.tanh(pre)
        deriv = 1 - act * act
    derivs, d_hs = split_time(deriv), split_time(d_h)
    dpres = [None] * length
    g = d_hs[-1]
    for t in reversed(range(length)):
        dpres[t] = g * derivs[t]
        if t == 0 and not need_d_state0:
            break
        rec = per_problem_matmul(dpres[t], w_h)
        g = rec if t == 0 else d_hs[t - 1] + rec
    dpre = mx.concatenate(dpres, axis=0).reshape(pre.shape)
    return dpre, dpre, ((rec,) if need_d_state0 else None)
