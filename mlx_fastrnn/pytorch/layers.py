"""``torch.nn.LSTM / GRU / RNN`` as MLX modules, on mlx_fastrnn's fused path.

Constructors, defaults, validation errors, parameter names and shapes,
initialisation, call signature and results are PyTorch's::

    lstm = LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None)
    output, (h_n, c_n) = lstm(input, hx=None, lengths=None)
    output, h_n = gru(input, hx=None, lengths=None)

* ``input``: ``(L, B, H_in)``, ``(B, L, H_in)`` with ``batch_first``, or
  unbatched ``(L, H_in)``.
* ``output``: ``(L, B, D * H_out)`` (batch-first / unbatched likewise), the
  directions concatenated on the last axis; ``H_out = proj_size or hidden_size``.
* ``h_n``: ``(num_layers * D, B, H_out)``, index ``layer * D + direction``;
  LSTM's ``c_n``: ``(num_layers * D, B, hidden_size)``. ``hx`` has the same
  shapes (LSTM: the tuple ``(h_0, c_0)``).
* ``lengths`` (int ``[B]``): what ``pack_padded_sequence(input, lengths,
  enforce_sorted=False)`` followed by ``pad_packed_sequence(total_length=L)``
  gives in PyTorch (see ``ops/direction.py``).

Parameters (PyTorch's names, so a converted ``state_dict`` loads with
``load_weights(..., strict=True)``): ``weight_ih_l{k}`` ``[G*H, in]``,
``weight_hh_l{k}`` ``[G*H, H_out]``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` ``[G*H]``,
``weight_hr_l{k}`` ``[H_out, H]`` (projection), suffix ``_reverse`` for the
second direction; gate order LSTM i, f, g, o, GRU r, z, n. Every parameter is
initialised from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) (``reset_parameters()``
draws them again), in ``dtype`` (an MLX floating dtype; default float32). ``device``
must be None: MLX arrays live in unified memory and run on ``mx.default_device()``.
``all_weights`` and ``flatten_parameters()`` (nothing to flatten: there is no
cuDNN weight buffer) are there for code that calls them.

Where PyTorch differs (deliberately): dtypes follow MLX's promotion, as ``mlx.nn``
layers do, where PyTorch refuses an input (or ``hx``) whose dtype differs from the
weights': a float16 input to float32 weights gives float32 results, a float32
input to bfloat16 weights float32, an integer input its float promotion, float64
anywhere float64 (on the per-step float64 path). Lengths must be integers, one
per row (PyTorch casts float lengths and drops extra ones), need batched input,
and are always taken as ``enforce_sorted=False``.

Per layer the input projection is one matmul over the whole sequence (on the
CPU one per direction) and the recurrence runs on the drop-in layers' path
(persistent or per-step kernels on a GPU, compiled cells on the CPU, fused
backward); how the directions run is :mod:`.directions`'. LSTM projections and
float64 run a per-step loop of MLX ops (``ops/stepwise.py``), as does
everything under ``MLX_RNN_IMPL=legacy``.
"""

import functools
import math
import numbers
import warnings

import mlx.core as mx
import mlx.nn as nn

from ..cells import GRU_CELL, LSTM_CELL, RNN_RELU_CELL, RNN_TANH_CELL
from ..config import current_impl
from ..ops import stepwise
from ..ops.direction import InputError, pad_time, prepare_lengths, truncate
from ..ops.projection import project
from ..ops.recurrent import FAST_DTYPES, cast_to, default_steps, result_dtype
from .directions import KernelRecurrence, direction_streams, on_stream, run_layer_directions

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class _RNNBase(nn.Module):
    """What the three layers share: PyTorch's ``RNNBase`` checks and parameters."""

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__()
        if device is not None:
            raise ValueError(f"device must be None (MLX arrays live in unified memory and run on "
                             f"mx.default_device()), got {device!r}")
        if dtype is not None and not (isinstance(dtype, mx.Dtype) and mx.issubdtype(dtype, mx.floating)):
            raise TypeError(f"dtype must be an MLX floating dtype such as mx.float16, got {dtype!r}")
        # The checks and messages of torch.nn.RNNBase, in its order.
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an "
                "element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                f"expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=3,
            )
        for name, value, kind in (("bias", bias, bool), ("batch_first", batch_first, bool),
                                  ("input_size", input_size, int)):
            if not isinstance(value, kind):
                raise TypeError(f"{name} should be of type {kind.__name__}, got: {type(value).__name__}")
            if name == "input_size" and value <= 0:
                raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = proj_size
        gate_size = _GATES[mode] * hidden_size
        out_size = proj_size or hidden_size
        # Plain attributes named as torch names them, so that parameters() has
        # exactly the keys (and order) of torch's state_dict.
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else out_size * self.num_directions
            for suffix in self._suffixes:
                shapes = [(f"weight_ih_l{layer}{suffix}", (gate_size, layer_in)),
                          (f"weight_hh_l{layer}{suffix}", (gate_size, out_size))]
                if bias:
                    shapes += [(f"bias_ih_l{layer}{suffix}", (gate_size,)),
                               (f"bias_hh_l{layer}{suffix}", (gate_size,))]
                if proj_size:
                    shapes += [(f"weight_hr_l{layer}{suffix}", (proj_size, hidden_size))]
                for name, shape in shapes:
                    setattr(self, name, mx.zeros(shape, dtype or mx.float32))
        self.reset_parameters()

    def reset_parameters(self):
        """Draw every parameter again from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)),
        in its dtype, as PyTorch's ``reset_parameters``."""
        scale = 1.0 / math.sqrt(self.hidden_size)
        for name in self._weight_names():
            w = getattr(self, name)
            setattr(self, name, mx.random.uniform(-scale, scale, w.shape).astype(w.dtype))

    def _weight_names(self):
        """The parameters' names per (layer, direction), in PyTorch's order: the order the
        constructor made them in (a Module keeps its keys' order)."""
        return [k for k, v in self.items() if isinstance(v, mx.array) and not k.startswith("_")]

    @property
    def all_weights(self):
        """The parameters as PyTorch's ``all_weights``: one list per (layer, direction),
        ``[weight_ih, weight_hh, bias_ih, bias_hh, weight_hr]`` (the biases with ``bias``, ``weight_hr``
        with ``proj_size``)."""
        names = self._weight_names()
        per = len(names) // (self.num_layers * self.num_directions)
        return [[getattr(self, n) for n in names[i:i + per]] for i in range(0, len(names), per)]

    def flatten_parameters(self):
        """Nothing to do (PyTorch packs cuDNN's weight buffer here; there is none): for code
        that calls it."""

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def _suffixes(self):
        return ("", "_reverse") if self.bidirectional else ("",)

    def _extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.mode.startswith("RNN"):
            s += f", nonlinearity={self.mode[4:].lower()!r}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s

    # ----------------------------------------------------------------- call

    def _run(self, input, hx, lengths):
        """Validate, then run every layer; returns ``(output, finals)`` with one
        ``[num_layers * D, B, *]`` array per state (unbatched: without the B axis)."""
        layer_name = "RNN" if self.mode.startswith("RNN") else self.mode
        if not isinstance(input, mx.array):
            raise InputError(f"{layer_name}: input must be an mx.array, got {type(input).__name__}")
        if input.ndim not in (2, 3):
            raise InputError(f"{layer_name}: Expected input to be 2D or 3D, got {input.ndim}D instead")
        if input.shape[-1] != self.input_size:
            raise InputError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {input.shape[-1]}"
            )
        batched = input.ndim == 3
        x = input if not batched else (input.swapaxes(0, 1) if self.batch_first else input)
        if not batched:
            x = x[:, None, :]
        length, batch = x.shape[0], x.shape[1]
        if length == 0:
            raise InputError(f"{layer_name}: got an empty sequence (length 0), input shape {tuple(input.shape)}")
        states0 = self._check_hx(hx, batch, batched)
        if lengths is not None and not batched:
            raise InputError("lengths needs batched input (L, B, H_in) or (B, L, H_in)")
        lens = prepare_lengths(lengths, length, batch) if lengths is not None else None

        # this module's own arrays (its parameters; it has no submodules): what
        # self.parameters() returns, without its tree walk (~40 us a call)
        params = {k: v for k, v in self.items() if isinstance(v, mx.array) and not k.startswith("_")}
        dtype = result_dtype(x, *params.values(),
                             *(s for s in (states0 or ()) if s is not None))
        if lens is not None:
            x = mx.where(lens.valid, truncate(x, lens), mx.zeros((), x.dtype))
        use_kernels = (current_impl() != "legacy" and self.proj_size == 0 and dtype in FAST_DTYPES
                       and batch > 0)
        finals = [[] for _ in range(2 if self.mode == "LSTM" else 1)]
        # the whole-sequence kernels may take both directions in one launch: one stream then
        stackable = use_kernels and default_steps(self._cell, current_impl() != "cell").accepts is not None
        streams = direction_streams(self.num_directions, stackable)
        layer_in = x
        for layer in range(self.num_layers):
            keys = [f"l{layer}{suffix}" for suffix in self._suffixes]
            xp = self._project(params, keys, layer_in, use_kernels, streams)
            s0s = [None if states0 is None else tuple(s[layer * self.num_directions + d] for s in states0)
                   for d in range(len(keys))]
            run = self._direction_kernels if use_kernels else self._direction_stepwise
            recurs = [run(params, key, layer_in.shape[1], s0) for key, s0 in zip(keys, s0s)]
            out, fins = run_layer_directions(recurs, xp, lens, use_kernels, streams)
            layer_in = cast_to(out, dtype)
            for acc, f in zip(finals, fins):
                acc.append(cast_to(f, dtype))
            if self.dropout and self.training and layer + 1 < self.num_layers:
                layer_in = _dropout(layer_in, self.dropout)
        output = pad_time(layer_in, lens, length)
        if not batched:
            output = output[:, 0]
        elif self.batch_first:
            output = output.swapaxes(0, 1)
        finals = tuple(f[0] if len(f) == 1 else mx.concatenate(f, axis=0) for f in finals)
        if not batched:
            finals = tuple(f[:, 0] for f in finals)
        return output, finals

    def _check_hx(self, hx, batch, batched):
        """``hx`` as a tuple of ``[num_layers * D, B, *]`` arrays, or ``None``."""
        if hx is None:
            return None
        lstm = self.mode == "LSTM"
        if lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise InputError("LSTM expects hx as a tuple (h_0, c_0)")
            hx = tuple(hx)
        else:
            if isinstance(hx, (tuple, list)):
                raise InputError(f"{self.mode[:3]} expects hx as one array, not a {type(hx).__name__}")
            hx = (hx,)
        if not all(isinstance(h, mx.array) for h in hx):
            raise InputError("hx must be mx.array(s)")
        want_dim = 3 if batched else 2
        if any(h.ndim != want_dim for h in hx):
            dims = ", ".join(f"{h.ndim}-D" for h in hx)
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise InputError(f"For {kind} input, hx should also be {want_dim}-D but got ({dims}) tensor(s)")
        if not batched:
            hx = tuple(h[:, None, :] for h in hx)
        layers_d = self.num_layers * self.num_directions
        sizes = [self.proj_size or self.hidden_size] + ([self.hidden_size] if lstm else [])
        for i, (h, size) in enumerate(zip(hx, sizes)):
            expected = (layers_d, batch, size)
            if tuple(h.shape) != expected:
                which = f"hidden[{i}]" if lstm else "hidden"
                raise InputError(f"Expected {which} size {expected}, got {list(h.shape)}")
        return hx

    # ------------------------------------------------ one (layer, direction)

    def _torch_weights(self, params, key):
        w_ih, w_hh = params["weight_ih_" + key], params["weight_hh_" + key]
        b_ih = params.get("bias_ih_" + key) if self.bias else None
        b_hh = params.get("bias_hh_" + key) if self.bias else None
        return w_ih, w_hh, b_ih, b_hh

    def _input_bias(self, b_ih, b_hh, directions=1):
        """The bias folded into the input projection of ``directions`` directions'
        joined biases (GRU: all of ``b_ih``, ``b_hh``'s r, z parts, by a constant mask:
        its n part is ``b_hn``, inside ``r * (...)``)."""
        if b_ih is None:
            return None
        if self.mode == "GRU":
            b_hh = mx.where(_gru_rz_mask(self.hidden_size, directions), b_hh, mx.zeros((), b_hh.dtype))
        return b_ih + b_hh

    def _hn_bias(self, b_hh):
        """GRU's ``b_hn`` (the n part of ``b_hh``, inside ``r * (...)``); None otherwise."""
        return b_hh[2 * self.hidden_size:] if self.mode == "GRU" and b_hh is not None else None

    def _project(self, params, keys, layer_in, fused, streams):
        """The input pre-activations of the directions (``keys``), time-major.
        With ``fused`` and the directions on one stream, ONE matmul by the
        directions' stacked ``W_ih`` over the layer input (the previous layer's
        output, directions concatenated): [L, B, D * G*H]; else a list, one per
        direction, each made on its direction's stream."""
        weights = [self._torch_weights(params, key) for key in keys]
        if not fused or any(s is not None for s in streams):
            xps = []
            for (w_ih, _, b_ih, b_hh), stream in zip(weights, streams):
                with on_stream(stream):
                    b = self._input_bias(b_ih, b_hh)
                    if fused:
                        xps.append(project(layer_in, w_ih, b))
                    else:
                        xps.append(layer_in @ w_ih.T if b is None else mx.addmm(b, layer_in, w_ih.T))
            return xps

        def joined(i):  # the directions' arrays i (W_ih, -, b_ih, b_hh) as one
            return weights[0][i] if len(keys) == 1 else mx.concatenate([w[i] for w in weights])

        b = self._input_bias(joined(2), joined(3), len(keys)) if self.bias else None
        return project(layer_in, joined(0), b)

    @property
    def _cell(self):
        return {"LSTM": LSTM_CELL, "GRU": GRU_CELL, "RNN_TANH": RNN_TANH_CELL, "RNN_RELU": RNN_RELU_CELL}[self.mode]

    def _direction_kernels(self, params, key, batch, s0):
        """``recur(xp)`` for one (layer, direction) on the fused cells."""
        _, w_hh, _, b_hh = self._torch_weights(params, key)
        bhn = self._hn_bias(b_hh)
        cell = self._cell
        hidden = self.hidden_size
        if s0 is None:
            states0 = (None,) * cell.num_states  # zero: no array (ops.sequence.recurrence)
            given = (False,) * cell.num_states
        else:
            states0 = tuple(s if s.dtype == mx.float32 else s.astype(mx.float32) for s in s0)
            given = (True,) * cell.num_states
        if self.mode == "GRU":
            cell_params = (mx.zeros((hidden,)) if bhn is None else bhn.astype(mx.float32),)
        else:
            cell_params = ()
        w_hh32 = w_hh if w_hh.dtype == mx.float32 else w_hh.astype(mx.float32)
        return KernelRecurrence(cell, default_steps(cell, current_impl() != "cell"), w_hh32, states0,
                                 cell_params, given)

    def _direction_stepwise(self, params, key, batch, s0):
        """``recur(xp)`` for one (layer, direction) as a per-step loop of MLX ops."""
        _, w_hh, _, b_hh = self._torch_weights(params, key)
        bhn = self._hn_bias(b_hh)
        dtype = w_hh.dtype
        out_size = self.proj_size or self.hidden_size
        h0 = mx.zeros((batch, out_size), dtype) if s0 is None else s0[0]
        if self.mode == "LSTM":
            c0 = mx.zeros((batch, self.hidden_size), dtype) if s0 is None else s0[1]
            w_hr = params.get("weight_hr_" + key)
            return lambda xp: stepwise.lstm(xp, w_hh, h0, c0, w_hr)
        if self.mode == "GRU":
            return lambda xp: stepwise.gru(xp, w_hh, bhn, h0)
        relu = self.mode == "RNN_RELU"
        return lambda xp: stepwise.rnn(xp, w_hh, h0, relu)


@functools.lru_cache(maxsize=None)
def _gru_rz_mask(hidden, directions):
    """bool [directions * 3 * hidden]: True on the r and z gates' entries of each direction."""
    return mx.array(([True] * (2 * hidden) + [False] * hidden) * directions)  # a constant: no graph


def _dropout(x, p):
    """Inverted dropout as ``torch.nn.functional.dropout`` in training mode."""
    if p >= 1:
        return mx.zeros_like(x)
    keep = mx.random.bernoulli(1 - p, x.shape)
    return mx.where(keep, x / mx.array(1 - p, x.dtype), mx.zeros((), x.dtype))


class LSTM(_RNNBase):
    """``torch.nn.LSTM`` (see the module docstring). Per step, gate order i, f, g, o::

        i, f, g, o = sigma, sigma, tanh, sigma (W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
        c_t = f * c_{t-1} + i * g        h_t = o * tanh(c_t)   (then W_hr h_t with proj_size)
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)

    def __call__(self, input, hx=None, lengths=None):
        """Returns ``(output, (h_n, c_n))``."""
        output, (h_n, c_n) = self._run(input, hx, lengths)
        return output, (h_n, c_n)


class GRU(_RNNBase):
    """``torch.nn.GRU`` (see the module docstring). Per step, gate order r, z, n::

        r, z = sigma(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)[r, z blocks]
        n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn))
        h_t = (1 - z) * n + z * h_{t-1}
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if kwargs:
            raise TypeError(f"GRU got unexpected keyword arguments {sorted(kwargs)}")
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)

    def __call__(self, input, hx=None, lengths=None):
        """Returns ``(output, h_n)``."""
        output, (h_n,) = self._run(input, hx, lengths)
        return output, h_n


class RNN(_RNNBase):
    """``torch.nn.RNN`` (see the module docstring)::

        h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh),  act = tanh or relu
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if kwargs:
            raise TypeError(f"RNN got unexpected keyword arguments {sorted(kwargs)}")
        if nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def __call__(self, input, hx=None, lengths=None):
        """Returns ``(output, h_n)``."""
        output, (h_n,) = self._run(input, hx, lengths)
        return output, h_n
