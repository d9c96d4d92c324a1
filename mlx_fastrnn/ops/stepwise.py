"""The recurrence as a per-step loop of plain MLX ops, differentiated by MLX.

What the PyTorch-compatible layers run where the fused cells do not apply:
LSTM with a projection (``proj_size``: ``h_t = W_hr (o_t * tanh(c_t))``),
dtypes other than float32 / float16 / bfloat16 (float64 stays float64), and
``MLX_RNN_IMPL=legacy`` (the composition of stock-style ops a port would write
by hand). Half-precision inputs are computed in float32 and cast back by the
caller.

All functions take a time-major ``xp`` [L, B, G*H] (input pre-activations
``x W_ih^T + b``) and return each state's sequence in step order.
"""

import mlx.core as mx


def _compute_dtype(*arrays):
    return mx.float64 if any(a is not None and a.dtype == mx.float64 for a in arrays) else mx.float32


def _cast(a, dtype):
    return a if a is None or a.dtype == dtype else a.astype(dtype)


def lstm(xp, w_hh, h0, c0, w_hr=None):
    """LSTM (gate order i, f, g, o); with ``w_hr`` [P, H] the LSTMP of PyTorch.
    ``h0`` [B, P or H], ``c0`` [B, H]; returns ``(h_seq, c_seq)``."""
    dtype = _compute_dtype(xp, w_hh, h0, c0, w_hr)
    xp, w_hh, h, c, w_hr = (_cast(a, dtype) for a in (xp, w_hh, h0, c0, w_hr))
    w_hh_t = w_hh.T
    w_hr_t = None if w_hr is None else w_hr.T
    hs, cs = [], []
    for t in range(xp.shape[0]):
        i, f, g, o = mx.split(xp[t] + h @ w_hh_t, 4, axis=-1)
        c = mx.sigmoid(f) * c + mx.sigmoid(i) * mx.tanh(g)
        h = mx.sigmoid(o) * mx.tanh(c)
        if w_hr_t is not None:
            h = h @ w_hr_t
        hs.append(h)
        cs.append(c)
    return mx.stack(hs), mx.stack(cs)


def gru(xp, w_hh, bhn, h0):
    """GRU as PyTorch's (gate order r, z, n; ``n = tanh(x_n + r (W_hn h + b_hn))``).
    ``xp`` holds ``b_ih`` and the r, z parts of ``b_hh``; ``bhn`` is ``b_hh``'s n part
    (or None)."""
    dtype = _compute_dtype(xp, w_hh, bhn, h0)
    xp, w_hh, bhn, h = (_cast(a, dtype) for a in (xp, w_hh, bhn, h0))
    hidden = h.shape[-1]
    w_hh_t = w_hh.T
    hs = []
    for t in range(xp.shape[0]):
        hp = h @ w_hh_t
        rz = mx.sigmoid(xp[t][..., : 2 * hidden] + hp[..., : 2 * hidden])
        r, z = rz[..., :hidden], rz[..., hidden:]
        hn = hp[..., 2 * hidden:] if bhn is None else hp[..., 2 * hidden:] + bhn
        n = mx.tanh(xp[t][..., 2 * hidden:] + r * hn)
        h = (1 - z) * n + z * h
        hs.append(h)
    return (mx.stack(hs),)


def rnn(xp, w_hh, h0, relu=False):
    """Elman RNN, ``h' = act(xp_t + h W_hh^T)`` with tanh or relu."""
    dtype = _compute_dtype(xp, w_hh, h0)
    xp, w_hh, h = (_cast(a, dtype) for a in (xp, w_hh, h0))
    act = mx.maximum if relu else None
    w_hh_t = w_hh.T
    hs = []
    for t in range(xp.shape[0]):
        pre = xp[t] + h @ w_hh_t
        h = act(pre, 0) if act is not None else mx.tanh(pre)
        hs.append(h)
    return (mx.stack(hs),)
