"""Drop-in subclasses of ``mlx.nn.GRU``, ``mlx.nn.LSTM`` and ``mlx.nn.RNN``.

Same constructor, parameters, call signature, results and errors as stock; the
recurrence runs on the fused path unless ``MLX_RNN_IMPL=legacy`` (or
``use_impl("legacy")``), which calls the stock code unchanged. The math of each
layer is in its stock docstring, inherited below.
"""

import mlx.core as mx
import mlx.nn as nn
import mlx.nn.layers.recurrent as _stock

from .config import current_impl
from .ops import recurrent as ops

_TANH = (nn.tanh, mx.tanh)
_RELU = (nn.relu,)


class GRU(_stock.GRU):
    __doc__ = _stock.GRU.__doc__

    def __call__(self, x, hidden=None):
        if _run_stock(x) or not ops.fast_path_supports(x, self.Wx, self.Wh, self.b, self.bhn, hidden):
            return super().__call__(x, hidden)
        return ops.gru(x, self.Wx, self.Wh, self.b, self.bhn, hidden, whole_sequence=_whole())


class LSTM(_stock.LSTM):
    __doc__ = _stock.LSTM.__doc__

    def __call__(self, x, hidden=None, cell=None):
        if _run_stock(x) or not ops.fast_path_supports(x, self.Wx, self.Wh, self.bias, hidden, cell):
            return super().__call__(x, hidden, cell)
        return ops.lstm(x, self.Wx, self.Wh, self.bias, hidden, cell, whole_sequence=_whole())


class RNN(_stock.RNN):
    __doc__ = _stock.RNN.__doc__

    def __call__(self, x, hidden=None):
        relu = _fused_activation(self.nonlinearity)
        if (
            _run_stock(x)
            or relu is None
            or not ops.fast_path_supports(x, self.Wxh, self.Whh, self.bias, hidden)
        ):
            return super().__call__(x, hidden)
        return ops.rnn(x, self.Wxh, self.Whh, self.bias, hidden, relu=relu, whole_sequence=_whole())


def _run_stock(x):
    """Legacy, or a single step (streaming): with no recurrence to fuse, stock's
    step was as fast as ours on the CPU and faster than the kernel path on the
    H100 (benchmarks/RESULTS.md), so length 1 runs stock's code."""
    if current_impl() == "legacy":
        return True
    return isinstance(x, mx.array) and x.ndim >= 2 and x.shape[-2] == 1


def _whole():
    return current_impl() != "cell"


def _fused_activation(fn):
    """False for tanh, True for relu, None for anything the kernels don't fuse."""
    # Exact types: a subclass may compute something else.
    if fn in _TANH or type(fn) is nn.Tanh:
        return False
    if fn in _RELU or type(fn) is nn.ReLU:
        return True
    return None
