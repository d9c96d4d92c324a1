"""A streaming GRU / LSTM step (length 1): stock's own math for one step, under ``mx.compile``.

With no recurrence to fuse, a length-1 call is stock's 10-15 small ops, each its
own kernel. Compiled, the elementwise tail is one fused kernel and the step one
call. The ops are stock's, in stock's order and dtype (``addmm`` / ``matmul`` in the
input dtype), so results equal stock's up to the rounding of the fusion, and grad,
vmap, jvp and grad of grad apply as to stock. The layers use it only for a plain
call: ``x`` [..., 1, D] with the states (if any) of ``x``'s batch shape; any other
length-1 call runs stock's code, and so does every RNN one (stock's RNN step is
two ``addmm`` and the activation already; compiled it gained nothing on the H100).

Measured on the H100 (benchmarks/RESULTS.md): forward 1.23-1.45x stock at
(1, 1, 640); under a gradient MLX does not fuse, and forward+backward ran
0.96-0.98x stock (a fused custom backward measured slower still, 0.70-0.83x).

    gru:  x = x W_x^T + b;  rz = sigmoid(x_rz + h W_rz^T);  n = tanh(x_n + r (h W_n^T + b_hn))
          h' = (1 - z) n + z h
    lstm: i, f, g, o = split(x W_x^T + b + h W_h^T);  c' = sig(f) c + sig(i) tanh(g)
          h' = sig(o) tanh(c')
"""

import mlx.core as mx


def _project(x, w_x, b):
    return x @ w_x.T if b is None else mx.addmm(b, x, w_x.T)


def _gru(x, w_x, w_h, b, bhn, hidden):
    x = _project(x, w_x, b)
    size = w_h.shape[1]
    rz = x[..., 0, :-size]
    n = x[..., 0, -size:]
    if hidden is not None:
        h_proj = hidden @ w_h.T
        h_proj_n = h_proj[..., -size:]
        if bhn is not None:
            h_proj_n = h_proj_n + bhn
        rz = rz + h_proj[..., :-size]
    r, z = mx.split(mx.sigmoid(rz), 2, axis=-1)
    if hidden is not None:
        n = n + r * h_proj_n
    elif bhn is not None:
        n = n + r * bhn
    n = mx.tanh(n)
    hidden = (1 - z) * n + z * hidden if hidden is not None else (1 - z) * n
    return mx.expand_dims(hidden, -2)


def _lstm(x, w_x, w_h, bias, hidden, cell):
    ifgo = _project(x, w_x, bias)[..., 0, :]
    if hidden is not None:
        ifgo = mx.addmm(ifgo, hidden, w_h.T)
    i, f, g, o = mx.split(ifgo, 4, axis=-1)
    i, f, g, o = mx.sigmoid(i), mx.sigmoid(f), mx.tanh(g), mx.sigmoid(o)
    cell = f * cell + i * g if cell is not None else i * g
    hidden = o * mx.tanh(cell)
    return mx.expand_dims(hidden, -2), mx.expand_dims(cell, -2)


gru_step = mx.compile(_gru)
lstm_step = mx.compile(_lstm)


def is_plain(x, input_size, hidden_size, *states):
    """Whether a call is a plain streaming step: ``x`` [..., 1, input_size]
    (at least 2-d) and each state None or [..., hidden_size] with x's batch shape."""
    if not isinstance(x, mx.array) or x.ndim < 2 or x.shape[-2] != 1 or x.shape[-1] != input_size:
        return False
    batch = x.shape[:-2]
    for s in states:
        if s is not None and (not isinstance(s, mx.array) or s.shape[:-1] != batch or s.shape[-1] != hidden_size):
            return False
    return True
