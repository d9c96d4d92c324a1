"""Functional GRU / LSTM / RNN: validate, project the input, run the recurrence.

Each op computes what the stock ``mlx.nn`` layer computes, with states and
accumulation in float32 and the result in the dtype stock would return.
Shapes are checked here, before any kernel is launched, and bad input raises
the exception type stock raises (with a message naming the expected shape).
"""

import functools
import os

import mlx.core as mx

from ..cells import GRU_CELL, LSTM_CELL, RNN_RELU_CELL, RNN_TANH_CELL, SLSTM_CELL
from ..cells.timeaxis import f32
from ..kernels.classes import Operand, kernel_choice_key
from ..kernels.launch import gpu_target
from .projection import project
from .heads import head_recurrence
from .sequence import recurrence

FAST_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def gru(x, w_x, w_h, b, bhn, hidden=None, steps=None, whole_sequence=True):
    batch = _check(x, w_x, _hidden(w_h), "GRU", hidden=hidden)
    return _dispatch(GRU_CELL, _gru, batch, steps, whole_sequence, x, w_x, w_h, b, bhn, hidden)


def _gru(batch, steps, whole_sequence, x, w_x, w_h, b, bhn, hidden):
    hidden_size = _hidden(w_h)
    batch = _check(x, w_x, hidden_size, "GRU", hidden=hidden) if batch is None else batch
    extras = [b, bhn, hidden, w_h if x.shape[-2] > 1 or hidden is not None else None]
    bhn32 = f32(bhn) if bhn is not None else mx.zeros((hidden_size,))
    (hs,), dtype = _run(GRU_CELL, x, w_x, b, w_h, batch, (hidden,), (bhn32,), extras, steps, whole_sequence)
    return cast_to(hs, dtype)


def lstm(x, w_x, w_h, bias, hidden=None, cell=None, steps=None, whole_sequence=True):
    batch = _check(x, w_x, _hidden(w_h), "LSTM", hidden=hidden, cell=cell, hidden_sets_batch=True)
    return _dispatch(LSTM_CELL, _lstm, batch, steps, whole_sequence, x, w_x, w_h, bias, hidden, cell)


def _lstm(batch, steps, whole_sequence, x, w_x, w_h, bias, hidden, cell):
    if batch is None:
        batch = _check(x, w_x, _hidden(w_h), "LSTM", hidden=hidden, cell=cell, hidden_sets_batch=True)
    extras = [bias, hidden, cell, w_h if x.shape[-2] > 1 or hidden is not None else None]
    (hs, cs), dtype = _run(LSTM_CELL, x, w_x, bias, w_h, batch, (hidden, cell), (), extras, steps,
                           whole_sequence)
    return cast_to(hs, dtype), cast_to(cs, dtype)


def rnn(x, w_xh, w_hh, bias, hidden=None, relu=False, steps=None, whole_sequence=True):
    batch = _check(x, w_xh, _hidden(w_hh), "RNN", hidden=hidden, hidden_sets_batch=True)
    cell = RNN_RELU_CELL if relu else RNN_TANH_CELL
    return _dispatch(cell, _rnn_relu if relu else _rnn_tanh, batch, steps, whole_sequence, x, w_xh, w_hh, bias,
                     hidden)


def _rnn(cell, batch, steps, whole_sequence, x, w_xh, w_hh, bias, hidden):
    if batch is None:
        batch = _check(x, w_xh, _hidden(w_hh), "RNN", hidden=hidden, hidden_sets_batch=True)
    extras = [bias, hidden, w_hh if x.shape[-2] > 1 or hidden is not None else None]
    (hs,), dtype = _run(cell, x, w_xh, bias, w_hh, batch, (hidden,), (), extras, steps, whole_sequence)
    return cast_to(hs, dtype)


def _rnn_tanh(*args):
    return _rnn(RNN_TANH_CELL, *args)


def _rnn_relu(*args):
    return _rnn(RNN_RELU_CELL, *args)


def slstm(x, w_x, w_h, bias, states=None, steps=None, whole_sequence=True):
    """The sLSTM (``cells/slstm``) over ``x`` [..., L, in]: ``states`` is None or
    ``(y, c, n, m)``, each [..., H] (broadcast to the batch); returns the four
    state sequences [..., L, H]."""
    if states is not None:
        if not isinstance(states, (tuple, list)) or len(states) != 4 or not all(
                isinstance(s, mx.array) for s in states):
            raise ValueError("SLSTM expects states as a tuple of four arrays (y, c, n, m) or None")
        shapes = {tuple(s.shape) for s in states}
        if len(shapes) != 1:
            raise ValueError(f"SLSTM: the states (y, c, n, m) must share one shape, got {sorted(shapes)}")
    batch = _check(x, w_x, _hidden(w_h), "SLSTM", hidden=None if states is None else states[0],
                   hidden_sets_batch=True)
    states = tuple(states) if states is not None else (None,) * 4
    return _dispatch(SLSTM_CELL, _slstm, batch, steps, whole_sequence, x, w_x, w_h, bias, *states)


def _slstm(batch, steps, whole_sequence, x, w_x, w_h, bias, *states):
    if batch is None:
        batch = _check(x, w_x, _hidden(w_h), "SLSTM", hidden=states[0], hidden_sets_batch=True)
    extras = [bias, *states, w_h]
    seqs, dtype = _run(SLSTM_CELL, x, w_x, bias, w_h, batch, states, (), extras, steps, whole_sequence)
    return tuple(cast_to(s, dtype) for s in seqs)


# A short layer call on CUDA is mostly fixed cost on the host: the Python that builds its
# graph, and MLX's CUDA eval, which spends ~5-15 us of host time per graph node (views
# included; a chain of 8 tiny adds took 0.115 ms against 0.023 for one, H200 host,
# 2026-12-04). mx.compile traces the op once per shapes and dtypes (and stream) and
# replays the graph: a drop-in LSTM 1x64x64 forward took 0.131 ms so against 0.336 (same
# process, same machine). Only where the whole-sequence kernels take the call: elsewhere
# the trace would unroll the step loop (L steps of ops). Under a gradient transform (or
# vmap, or a user's compile) the inputs are tracers and MLX runs the function itself.
# Each new input signature costs a trace (milliseconds), so a compiled op takes at most
# MAX_SIGNATURES of them (e.g. distinct sequence lengths) and runs directly past that.
# MLX_FASTRNN_COMPILE=0 turns it off.
MAX_SIGNATURES = 32
_COMPILED = {}


def _dispatch(cell, core, batch, steps, whole_sequence, x, w_x, w_h, *optional):
    """``core(batch, steps, whole_sequence, x, w_x, w_h, *optional)``, compiled where
    the comment above says (``optional``: arrays or None, e.g. states not given). The
    compiled function is cached per core, ``whole_sequence``, which arrays are None and
    what the launch depends on besides shapes (``kernel_choice_key``: the trace freezes
    it), with the input signatures it has traced."""
    if steps is None and whole_sequence and w_h.ndim == 2 and x.shape[-2] > 1 and compile_enabled() \
            and gpu_target() == "cuda":
        choice = kernel_choice_key()
        # the recurrence gets W_h in float32 whatever its dtype (ops.sequence)
        if _kernels_take(cell, batch, x.shape[-2], tuple(w_h.shape), result_dtype(x, w_x, optional[0]), choice):
            present = tuple(a is not None for a in optional)
            arrays = (x, w_x, w_h, *(a for a in optional if a is not None))
            key = (core, whole_sequence, present, choice)
            entry = _COMPILED.get(key)
            if entry is None:
                entry = _COMPILED[key] = (mx.compile(_flat_call(core, whole_sequence, present)), set())
            fn, signatures = entry
            signature = tuple((a.shape, a.dtype) for a in arrays)
            if signature in signatures or len(signatures) < MAX_SIGNATURES:
                signatures.add(signature)
                return fn(*arrays)
    return core(batch, steps, whole_sequence, x, w_x, w_h, *optional)


def _flat_call(core, whole_sequence, present):
    """``core`` over the arrays given only (mx.compile takes arrays), the Nones put back."""
    def flat(x, w_x, w_h, *given):
        it = iter(given)
        return core(None, None, whole_sequence, x, w_x, w_h, *(next(it) if p else None for p in present))

    return flat


@functools.lru_cache(maxsize=1024)
def _kernels_take(cell, batch, length, w_shape, xp_dtype, choice):
    """Whether the default steps' whole-sequence kernels take the forward and the
    backward (``Steps.accepts``) of a [length, batch, G*H] projection and a float32
    W_h of ``w_shape`` (``choice``: ``kernel_choice_key()``, part of the cache key)."""
    steps = default_steps(cell, True)
    if steps.accepts is None:
        return False
    n_batch = 1
    for d in batch:
        n_batch *= d
    return steps.accepts(Operand((length, n_batch, w_shape[0]), xp_dtype, 3), Operand(w_shape, mx.float32, 2))


def compile_enabled():
    """``MLX_FASTRNN_COMPILE``: on unless 0 / false / off / no."""
    return os.environ.get("MLX_FASTRNN_COMPILE", "").strip().lower() not in ("0", "false", "off", "no")


def fast_path_supports(x, *arrays):
    """Whether the fused path covers this call: MLX arrays with a float32, float16
    or bfloat16 result and no empty axis. Anything else (float64, empty batches,
    numpy input) runs the stock code, which also raises stock's errors for it."""
    if not isinstance(x, mx.array) or x.size == 0:
        return False
    dtype = x.dtype
    for a in arrays:
        if a is None:
            continue
        if not isinstance(a, mx.array):
            return False
        if a.dtype != dtype:
            dtype = mx.result_type(dtype, a.dtype)
    return dtype in FAST_DTYPES


def _run(cell, x, w_x, b, w_h, batch, states, params, extras, steps, whole_sequence):
    """Project the input, broadcast states to the batch, run the recurrence
    (``steps``, or the device's default ones).
    (Each op costs microseconds on the CPU: no reshape, copy or cast that isn't needed.)"""
    length, hidden_size = x.shape[-2], _hidden(w_h)
    n_batch = 1
    for d in batch:
        n_batch *= d
    # the states not given are zero and no array (ops.sequence.recurrence): a zeros array
    # would be a graph node, a fill on a GPU
    states0 = tuple(None if s is None else _state(s, batch, n_batch, hidden_size) for s in states)
    given = tuple(s is not None for s in states)
    # Input projection for the whole sequence in one matmul, produced time-major.
    xt = x if x.ndim == 3 else x.reshape(-1, *x.shape[-2:])
    xt = xt.swapaxes(0, 1) if length > 1 else xt.reshape(1, -1, x.shape[-1])
    xp = project(xt, w_x, b)
    dtype = result_dtype(xp, *extras)
    if xp.shape[1] != n_batch:
        # A state with more batch axes than the input: stock broadcasts x to it.
        gh = xp.shape[-1]
        x_batch = (1,) * (len(batch) - (x.ndim - 2)) + tuple(x.shape[:-2])
        xp = mx.broadcast_to(xp.reshape(length, *x_batch, gh), (length, *batch, gh))
        xp = mx.contiguous(xp.reshape(length, n_batch, gh))
    steps = steps or default_steps(cell, whole_sequence)
    if w_h.ndim == 4:  # R [G, N, D, D] of N heads (mlx_fastrnn.multihead)
        seqs = head_recurrence(cell, steps, xp, w_h, states0, params, given)
    else:
        seqs = recurrence(cell, steps, xp, f32(w_h), states0, params, given)
    if batch != (n_batch,):
        seqs = tuple(s.reshape(length, *batch, hidden_size) for s in seqs)
    if length == 1:
        return tuple(s.reshape(*batch, 1, hidden_size) for s in seqs), dtype
    return tuple(mx.moveaxis(s, 0, -2) for s in seqs), dtype


def _hidden(w_h):
    """The hidden size of a dense ``W_h`` [G*H, H] or a multi-head ``R`` [G, N, D, D]."""
    return w_h.shape[1] * w_h.shape[2] if w_h.ndim == 4 else w_h.shape[1]


def cast_to(a, dtype):
    """``a`` as ``dtype``, without an op when it already is."""
    return a if a.dtype == dtype else a.astype(dtype)


def _state(s, batch, n_batch, hidden_size):
    s = f32(s)
    if tuple(s.shape) != (*batch, hidden_size):
        s = mx.broadcast_to(s, (*batch, hidden_size))
    return s if s.ndim == 2 else s.reshape(n_batch, hidden_size)


def default_steps(cell, whole_sequence=True):
    """Fused kernels on a GPU that has them (on CUDA, whole-sequence kernels
    first unless ``whole_sequence`` is False), the compiled reference step elsewhere.
    Decided per call, from the device the call runs on."""
    target = gpu_target()
    if target is not None:
        return cell.kernel_steps(target, whole_sequence)
    return cell.compiled_steps


def result_dtype(*arrays):
    """The dtype stock's ops give for these arrays (``None`` entries skipped)."""
    dtype = None
    for a in arrays:
        if a is None:
            continue
        if dtype is None:
            dtype = a.dtype
        elif a.dtype != dtype:
            dtype = mx.result_type(dtype, a.dtype)
    return dtype


def _check(x, w_x, hidden_size, layer, hidden=None, cell=None, hidden_sets_batch=False):
    """Validate shapes like stock would (same exception types); return the batch shape."""
    input_size = w_x.shape[1]
    expected = f"{layer} expects input of shape (N, L, {input_size}) or (L, {input_size})"
    if x.ndim == 0:
        raise ValueError(f"{expected}; got a 0-d array.")
    if x.ndim == 1:
        raise IndexError(f"{expected}; got shape {tuple(x.shape)} (no sequence axis).")
    if x.shape[-1] != input_size:
        raise ValueError(f"{expected}; got shape {tuple(x.shape)} (feature size {x.shape[-1]}).")
    if x.shape[-2] == 0:
        raise ValueError(f"{layer} got an empty sequence (length 0): input shape {tuple(x.shape)}.")
    batch = tuple(x.shape[:-2])
    for name, s in (("hidden", hidden), ("cell", cell)):
        if s is None:
            continue
        if name == "cell":
            # Stock only multiplies the cell state elementwise: anything that
            # broadcasts against (batch..., H) is accepted.
            try:
                full = mx.broadcast_shapes((*batch, hidden_size), tuple(s.shape))
            except ValueError:
                raise ValueError(
                    f"{layer}: cell of shape {tuple(s.shape)} does not broadcast with "
                    f"(batch..., {hidden_size}) = {(*batch, hidden_size)}."
                ) from None
            batch = tuple(full[:-1])
            continue
        if s.ndim == 0 or s.shape[-1] != hidden_size:
            raise ValueError(
                f"{layer} expects {name} of shape (N, {hidden_size}) or ({hidden_size},); "
                f"got {tuple(s.shape)}."
            )
        s_batch = tuple(s.shape[:-1])
        try:
            new_batch = mx.broadcast_shapes(batch, s_batch)
        except ValueError:
            raise ValueError(
                f"{layer}: {name} batch shape {s_batch} does not broadcast with the "
                f"input batch shape {batch}."
            ) from None
        if name == "hidden" and hidden_sets_batch and tuple(new_batch) != s_batch:
            # Stock adds x_t into the hidden projection with addmm, whose output
            # takes hidden's batch shape: x's batch must broadcast into it.
            raise ValueError(
                f"{layer}: the input batch shape {batch} must broadcast to hidden's "
                f"batch shape {s_batch} (hidden shape {tuple(s.shape)})."
            )
        batch = tuple(new_batch)
    return batch
