"""Elman RNN step in plain MLX ops: the reference every RNN kernel is tested against.

Shapes: x [..., H] input pre-activations ``x W_xh^T + bias`` (any float dtype),
hp [..., H] recurrent projection ``h W_hh^T`` (float32), h [..., H] (float32).

    h' = act(x + hp)      act = tanh or relu
"""

import mlx.core as mx


def forward_step(x, hp, states, params, relu=False):
    """One time step. ``states = (h,)``, ``params = ()``; returns ``(h',)``."""
    pre = x.astype(mx.float32) + hp
    return (mx.maximum(pre, 0.0) if relu else mx.tanh(pre),)


def backward_step(d_out, d_rec, x, hp, states, params, relu=False):
    """Adjoint of :func:`forward_step`; returns ``(dpre, dpre, (None,))``."""
    pre = x.astype(mx.float32) + hp
    dh = d_out[0] + d_rec[0]
    if relu:
        dpre = mx.where(pre > 0, dh, 0.0)
    else:
        t = mx.tanh(pre)
        dpre = dh * (1 - t * t)
    return dpre, dpre, (None,)
