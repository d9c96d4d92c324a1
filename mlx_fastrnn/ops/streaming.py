"""A streaming step (length 1): the cell once, with as few ops as the math allows.

With no recurrence to fuse, a length-1 call costs what its ops cost to launch
and, above all, to build on the host: stock's step is 10-15 small ops, and
autodiff adds as many again.

- On a GPU (Metal, CUDA), GRU / LSTM: two matmuls (``x W_x^T + b``, ``h W_h^T``)
  and ONE fused kernel for the gates and the state update (the cell's forward
  step kernel), as a differentiable op (``cell_op``) whose VJP is the cell's
  fused backward kernel: a training step is that kernel plus the matmuls' own
  VJPs. The step is also under ``mx.compile``: for inference a call replays the
  graph without running Python. (Under a gradient MLX runs a compiled function
  as written: it does not compile arrays that are being traced.)
- On the CPU, GRU / LSTM: stock's own math for one step under ``mx.compile``.
- RNN, everywhere: stock's ops without the stack of its one output.

The layers use these only for a plain call: ``x`` [..., 1, D] with the states
(if any) of ``x``'s batch shape; any other length-1 call runs stock's code.

    gru:  x = x W_x^T + b;  rz = sigmoid(x_rz + h W_rz^T);  n = tanh(x_n + r (h W_n^T + b_hn))
          h' = (1 - z) n + z h
    lstm: i, f, g, o = split(x W_x^T + b + h W_h^T);  c' = sig(f) c + sig(i) tanh(g)
          h' = sig(o) tanh(c')
    rnn:  h' = act(x W_xh^T + b + h W_hh^T)
"""

import functools
import importlib

import mlx.core as mx

from ..cells import GRU_CELL, LSTM_CELL
from ..kernels.launch import gpu_target
from .recurrent import cast_to, result_dtype


def _project(x, w_x, b):
    return x @ w_x.T if b is None else mx.addmm(b, x, w_x.T)


# ----------------------------------------------------------------------------- GPU


@functools.lru_cache(maxsize=256)
def _zeros(shape, dtype):
    """A zero operand, made once per shape and dtype: a constant in the graph
    (no fill kernel per call, and no gradient flows into it)."""
    z = mx.zeros(shape, dtype)
    mx.eval(z)
    return z


@functools.lru_cache(maxsize=None)
def cell_op(cell, target):
    """The fused forward step of ``cell`` on ``target`` as a differentiable op
    ``op(x, hp, *states, *params) -> outputs`` (the step contract of
    docs/DESIGN.md; leading axes those of ``x``). The operands other than
    ``x`` share one dtype, which the outputs get too: float32 math inside,
    and half states go in and out without casts.

    VJP: the fused backward step kernel. jvp: the reference step's. vmap and
    a gradient of the gradient reach a kernel, which has neither in MLX: MLX
    refuses them loudly (README, known limitations). (A custom function around
    the backward would make second order right, at ~10 us per training step
    on the H100's host: a streaming step is host-bound.)
    """
    kernels = importlib.import_module(cell.kernels)
    n = cell.num_states

    def unpack(args):
        x, hp, *rest = args
        return x, hp, tuple(rest[:n]), tuple(rest[n:])

    def forward_kernel(*args):
        # The kernel sees its inputs through stop_gradient: jvp would otherwise
        # push tangents through the kernel (it visits everything the outputs
        # depend on), and a kernel has no jvp. Tangents come from forward_jvp.
        x, hp, states, params = unpack([mx.stop_gradient(a) for a in args])
        return tuple(kernels.forward_step(x, hp, states, params, target=target, dtype=hp.dtype))

    def forward_reference(*args):
        x, hp, states, params = unpack(args)
        return tuple(cell.forward_step(x, hp, states, params, **cell.step_kwargs))

    forward = mx.custom_function(forward_kernel)

    @forward.jvp
    def forward_jvp(primals, tangents):
        tangents = [mx.zeros_like(p) if t is None else t for p, t in zip(primals, tangents)]
        return tuple(mx.jvp(forward_reference, list(primals), tangents)[1])

    @forward.vjp
    def forward_vjp(primals, cotangents, outputs):
        x, hp, states, params = unpack(primals)
        d_out = tuple(mx.zeros_like(o) if c is None else c for c, o in zip(cotangents, outputs))
        d_rec = tuple(_zeros(tuple(s.shape), hp.dtype) for s in states)
        dx, dhp, direct = kernels.backward_step(d_out, d_rec, x, hp, states, params, target=target,
                                                dtype=hp.dtype)
        d_states = (mx.zeros_like(s) if d is None else d for d, s in zip(direct, states))
        return (cast_to(dx, x.dtype), dhp, *d_states, *cell.param_grads(dhp))

    return forward


def _gru_fused(target, x, w_x, w_h, b, bhn, hidden):
    hidden_size = w_h.shape[1]
    xp = _project(x, w_x, b)  # [..., 1, 3H]
    lead = tuple(xp.shape[:-1])
    # stock's result dtype; the op's states and outputs are of it
    dtype = result_dtype(xp, bhn, hidden, w_h if hidden is not None else None)
    if hidden is None:
        hp, h = _zeros((*lead, 3 * hidden_size), dtype), _zeros((*lead, hidden_size), dtype)
    else:
        # hidden @ W_h^T as stock forms it ([B, H] @ [H, 3H], one GEMM), then
        # the step's [..., 1, ·] view
        hp = cast_to(mx.expand_dims(hidden @ w_h.T, -2), dtype)
        h = cast_to(mx.expand_dims(hidden, -2), dtype)
    bhn = _zeros((hidden_size,), dtype) if bhn is None else cast_to(bhn, dtype)
    (h_out,) = cell_op(GRU_CELL, target)(xp, hp, h, bhn)
    return h_out


def _lstm_fused(target, x, w_x, w_h, bias, hidden, cell):
    hidden_size = w_h.shape[1]
    xp = _project(x, w_x, bias)  # [..., 1, 4H]
    lead = tuple(xp.shape[:-1])
    dtype = result_dtype(xp, hidden, w_h if hidden is not None else None, cell)
    state_zeros = _zeros((*lead, hidden_size), dtype)
    # h enters the LSTM step only through hp: the op gets a constant in its place.
    if hidden is None:
        hp = _zeros((*lead, 4 * hidden_size), dtype)
    else:
        hp = cast_to(mx.expand_dims(hidden @ w_h.T, -2), dtype)
    c = state_zeros if cell is None else cast_to(mx.expand_dims(cell, -2), dtype)
    h_out, c_out = cell_op(LSTM_CELL, target)(xp, hp, state_zeros, c)
    return h_out, c_out


# ----------------------------------------------------------------------------- CPU


def _gru_math(x, w_x, w_h, b, bhn, hidden):
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


def _lstm_math(x, w_x, w_h, bias, hidden, cell):
    ifgo = _project(x, w_x, bias)[..., 0, :]
    if hidden is not None:
        ifgo = mx.addmm(ifgo, hidden, w_h.T)
    i, f, g, o = mx.split(ifgo, 4, axis=-1)
    i, f, g, o = mx.sigmoid(i), mx.sigmoid(f), mx.tanh(g), mx.sigmoid(o)
    cell = f * cell + i * g if cell is not None else i * g
    hidden = o * mx.tanh(cell)
    return mx.expand_dims(hidden, -2), mx.expand_dims(cell, -2)


_gru_compiled = mx.compile(_gru_math)
_lstm_compiled = mx.compile(_lstm_math)


# ----------------------------------------------------------------------------- entry points


# Compiled too: without a gradient (inference) a call replays the step's graph
# without running any Python; under a transformation MLX runs the function as
# it is. (The tests swap in the plain functions for the host-harness targets.)
_gru_gpu = mx.compile(_gru_fused)
_lstm_gpu = mx.compile(_lstm_fused)


def gru_step(x, w_x, w_h, b, bhn, hidden):
    target = gpu_target()
    if target is None:
        return _gru_compiled(x, w_x, w_h, b, bhn, hidden)
    return _gru_gpu(target, x, w_x, w_h, b, bhn, hidden)


def lstm_step(x, w_x, w_h, bias, hidden, cell):
    target = gpu_target()
    if target is None:
        return _lstm_compiled(x, w_x, w_h, bias, hidden, cell)
    return _lstm_gpu(target, x, w_x, w_h, bias, hidden, cell)


def rnn_step(x, w_xh, w_hh, bias, hidden, nonlinearity):
    """Stock's RNN step, in stock's forms, without the stack of its one output
    (a copy, and a slice in the backward): a free reshape instead."""
    y = _project(x, w_xh, bias)
    if hidden is None:  # stock applies it to the step's [..., H] slice (a callable may care)
        return mx.expand_dims(nonlinearity(y[..., 0, :]), -2)
    return mx.expand_dims(nonlinearity(mx.addmm(y[..., 0, :], hidden, w_hh.T)), -2)


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
