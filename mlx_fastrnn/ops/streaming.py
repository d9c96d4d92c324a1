"""A streaming step (length 1): stock's math for one step, fused, with a fused backward.

With no recurrence to fuse, a length-1 call is stock's 10-15 small ops, each its
own kernel, and autodiff adds as many again. Here the forward is stock's ops in
stock's order and dtype under ``mx.compile`` (the elementwise tail one fused
kernel), returning besides the outputs the activations the backward needs; the
VJP is the cell's backward on those: elementwise, then one matmul per cotangent,
each a separate lazy array so that cotangents nobody asks for (the carried
state's, usually) are never computed. vmap and jvp go through the forward;
a gradient of the gradient raises (the saved activations are constants to the
backward). The GRU and LSTM layers use it only for a plain call: ``x``
[..., 1, D] with the states (if any) of ``x``'s batch shape; any other length-1
call runs stock's code, and so does every RNN one (stock's step is two addmm and
the activation already: measured on the H100, compiling it gained nothing).

    gru:  x = x W_x^T + b;  rz = sigmoid(x_rz + h W_rz^T);  n = tanh(x_n + r (h W_n^T + b_hn))
          h' = (1 - z) n + z h
    lstm: i, f, g, o = split(x W_x^T + b + h W_h^T);  c' = sig(f) c + sig(i) tanh(g)
          h' = sig(o) tanh(c')
"""

import functools

import mlx.core as mx


def _project(x, w_x, b):
    return x @ w_x.T if b is None else mx.addmm(b, x, w_x.T)


def _rows(a):
    return a.reshape(-1, a.shape[-1])


# Each cell: ``forward(args) -> (outputs, saved)`` in stock's ops, and
# ``backward(args, saved, d_outputs) -> {arg name: cotangent}`` (one matmul per
# weight gradient over the flattened batch). ``saved`` holds the activations the
# backward needs, so it recomputes nothing.

# ----------------------------------------------------------------------------- GRU


def _gru_forward(x, w_x, w_h, b, bhn, hidden):
    size = w_h.shape[1]
    xp = _project(x, w_x, b)
    rz, n = xp[..., 0, :-size], xp[..., 0, -size:]
    hn = None
    if hidden is not None:
        h_proj = hidden @ w_h.T
        hn = h_proj[..., -size:]
        if bhn is not None:
            hn = hn + bhn
        rz = rz + h_proj[..., :-size]
    elif bhn is not None:
        hn = bhn
    r, z = mx.split(mx.sigmoid(rz), 2, axis=-1)
    if hn is not None:
        n = n + r * hn
    else:
        hn = mx.zeros_like(n)
    n = mx.tanh(n)
    h = (1 - z) * n + z * hidden if hidden is not None else (1 - z) * n
    return (mx.expand_dims(h, -2),), (r, z, n, hn)


def _gru_backward(x, w_x, w_h, b, bhn, hidden, saved, d_outs):
    r, z, n, hn = saved
    g = d_outs[0][..., 0, :]
    dn = g * (1 - z) * (1 - n * n)
    dz = g * ((hidden if hidden is not None else 0) - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    dxp = mx.concatenate([dr, dz, dn], axis=-1)
    grads = {"x": mx.expand_dims(dxp @ w_x, -2), "w_x": _rows(dxp).T @ _rows(x),
             "b": _rows(dxp).sum(axis=0), "bhn": _rows(dn * r).sum(axis=0)}
    if hidden is not None:
        dhp = mx.concatenate([dr, dz, dn * r], axis=-1)
        grads["w_h"] = _rows(dhp).T @ _rows(hidden)
        grads["hidden"] = mx.addmm(g * z, dhp, w_h)
    else:
        grads["w_h"] = mx.zeros_like(w_h)
    return grads


# ----------------------------------------------------------------------------- LSTM


def _lstm_forward(x, w_x, w_h, bias, hidden, cell):
    ifgo = _project(x, w_x, bias)[..., 0, :]
    if hidden is not None:
        ifgo = mx.addmm(ifgo, hidden, w_h.T)
    i, f, g, o = mx.split(ifgo, 4, axis=-1)
    i, f, g, o = mx.sigmoid(i), mx.sigmoid(f), mx.tanh(g), mx.sigmoid(o)
    cell = f * cell + i * g if cell is not None else i * g
    tc = mx.tanh(cell)
    return (mx.expand_dims(o * tc, -2), mx.expand_dims(cell, -2)), (i, f, g, o, tc)


def _lstm_backward(x, w_x, w_h, bias, hidden, cell, saved, d_outs):
    i, f, g, o, tc = saved
    dh = d_outs[0][..., 0, :]
    dc = d_outs[1][..., 0, :] + dh * o * (1 - tc * tc)
    df = dc * cell * f * (1 - f) if cell is not None else mx.zeros_like(dc)
    dpre = mx.concatenate([dc * g * i * (1 - i), df, dc * i * (1 - g * g), dh * tc * o * (1 - o)], axis=-1)
    grads = {"x": mx.expand_dims(dpre @ w_x, -2), "w_x": _rows(dpre).T @ _rows(x),
             "bias": _rows(dpre).sum(axis=0)}
    if hidden is not None:
        grads["w_h"] = _rows(dpre).T @ _rows(hidden)
        grads["hidden"] = dpre @ w_h
    else:
        grads["w_h"] = mx.zeros_like(w_h)
    if cell is not None:
        grads["cell"] = dc * f
    return grads


# ----------------------------------------------------------------------------- custom functions

# The arguments of each cell's step, in order; optional ones may be None.
_ARGS = {
    "gru": ("x", "w_x", "w_h", "b", "bhn", "hidden"),
    "lstm": ("x", "w_x", "w_h", "bias", "hidden", "cell"),
}
_MATH = {
    "gru": (_gru_forward, _gru_backward, 1),
    "lstm": (_lstm_forward, _lstm_backward, 2),
}


@mx.custom_function
def _second_order_guard(*saved):
    """Identity on the saved activations whose VJP refuses: the backward takes
    them as constants, so a gradient of the gradient through them would be
    silently wrong (MLX hands the VJP zero cotangents for unused outputs, so
    the VJP itself cannot tell)."""
    return tuple(saved)


@_second_order_guard.vjp
def _second_order_guard_vjp(primals, cotangents, outputs):
    raise NotImplementedError(
        "mlx_fastrnn: second-order gradients through the fused streaming step are not "
        "supported; run this model with MLX_RNN_IMPL=legacy (or use_impl('legacy'))."
    )


@functools.lru_cache(maxsize=None)
def _step_function(cell, present):
    """The step of ``cell`` for the arguments flagged in ``present``: a custom
    function whose forward is compiled and whose VJP is the cell's backward on
    the saved activations (extra outputs of the forward)."""
    names = [n for n, p in zip(_ARGS[cell], present) if p]
    forward, backward, n_out = _MATH[cell]

    def full(args):
        given = dict(zip(names, args))
        return [given.get(n) for n in _ARGS[cell]]

    def flat_forward(*args):
        outs, saved = forward(*full(args))
        return (*outs, *saved)

    compiled_forward = mx.compile(flat_forward)

    @mx.custom_function
    def step(*args):
        return compiled_forward(*args)

    @step.vjp
    def step_vjp(primals, cotangents, outputs):
        # Plain lazy ops, one array per cotangent: those nobody asked for (the
        # carried state's, typically) are never computed.
        outs, saved = outputs[:n_out], _second_order_guard(*outputs[n_out:])
        d_outs = tuple(mx.zeros_like(o) if c is None else c for c, o in zip(cotangents[:n_out], outs))
        grads = backward(*full(primals), saved, d_outs)
        return tuple(grads[n].astype(p.dtype) for n, p in zip(names, primals))

    def call(*args):
        outs = step(*args)  # the layer's outputs, then the saved activations
        return outs[0] if n_out == 1 else tuple(outs[:n_out])

    return call


def step(cell, *args):
    """One streaming step of ``cell`` ('gru' or 'lstm')
    on stock's arguments (``_ARGS``; optional ones None). Returns what stock's
    layer returns for a length-1 input."""
    present = tuple(a is not None for a in args)
    return _step_function(cell, present)(*(a for a in args if a is not None))


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
