"""LSTM step in plain MLX ops: the reference every LSTM kernel is tested against.

Shapes (any leading batch axes ``...``; ``H`` hidden size):
  x   [..., 4H]  input pre-activations ``x W_x^T + b`` in gate order i, f, g, o (any float dtype)
  hp  [..., 4H]  recurrent projection ``h W_h^T`` (float32)
  h,c [..., H]   previous hidden and cell state (float32)

    i, f, o = sigmoid(x + hp)[i, f, o blocks]   g = tanh(x_g + hp_g)
    c' = f * c + i * g                          h' = o * tanh(c')
"""

import mlx.core as mx


def _gates(x, hp):
    i, f, g, o = mx.split(x.astype(mx.float32) + hp, 4, axis=-1)
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
