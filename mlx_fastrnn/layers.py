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
from .ops import streaming

_TANH = (nn.tanh, mx.tanh)
_RELU = (nn.relu,)


class GRU(_stock.GRU):
    __doc__ = _stock.GRU.__doc__

    def __call__(self, x, hidden=None):
        if _run_stock(x):
            return super().__call__(x, hidden)
        w_x, w_h, b, bhn = self.Wx, self.Wh, self.b, self.bhn
        if not ops.fast_path_supports(x, w_x, w_h, b, bhn, hidden) or not _vectors(b, w_x, bhn, w_h):
            return super().__call__(x, hidden)
        if _is_step(x):
            if streaming.is_plain(x, w_x.shape[1], w_h.shape[1], hidden):
                return streaming.gru_step(x, w_x, w_h, b, bhn, hidden)
            return super().__call__(x, hidden)
        return ops.gru(x, w_x, w_h, b, bhn, hidden, whole_sequence=_whole())


class LSTM(_stock.LSTM):
    __doc__ = _stock.LSTM.__doc__

    def __call__(self, x, hidden=None, cell=None):
        if _run_stock(x):
            return super().__call__(x, hidden, cell)
        w_x, w_h, bias = self.Wx, self.Wh, self.bias
        if not ops.fast_path_supports(x, w_x, w_h, bias, hidden, cell) or not _vectors(bias, w_x):
            return super().__call__(x, hidden, cell)
        if _is_step(x):
            if streaming.is_plain(x, w_x.shape[1], w_h.shape[1], hidden, cell):
                return streaming.lstm_step(x, w_x, w_h, bias, hidden, cell)
            return super().__call__(x, hidden, cell)
        return ops.lstm(x, w_x, w_h, bias, hidden, cell, whole_sequence=_whole())


class RNN(_stock.RNN):
    __doc__ = _stock.RNN.__doc__

    def __call__(self, x, hidden=None):
        if _run_stock(x):
            return super().__call__(x, hidden)
        w_x, w_h, bias = self.Wxh, self.Whh, self.bias
        if not _vectors(bias, w_x):
            return super().__call__(x, hidden)
        if isinstance(x, mx.array) and _is_step(x):
            if streaming.is_plain(x, w_x.shape[1], w_h.shape[1], hidden):
                return streaming.rnn_step(x, w_x, w_h, bias, hidden, self.nonlinearity)
            return super().__call__(x, hidden)
        relu = _fused_activation(self.nonlinearity)
        if relu is None or not ops.fast_path_supports(x, w_x, w_h, bias, hidden):
            return super().__call__(x, hidden)
        return ops.rnn(x, w_x, w_h, bias, hidden, relu=relu, whole_sequence=_whole())


def _run_stock(x):
    return current_impl() == "legacy"


def _vectors(b, w, bhn=None, w_h=None):
    """Whether the biases are the vectors stock makes (``b`` [rows of ``w``], GRU's
    ``bhn`` [H]) or None. A bias a user replaced by one that merely broadcasts (say
    shape (1,)) runs stock's code: the kernels read a bias of full length, and stock's
    autodiff sums its gradient back to its shape."""
    # (on every call: plain comparisons, nothing built)
    if b is not None and not (isinstance(b, mx.array) and b.shape == (w.shape[0],)):
        return False
    return bhn is None or isinstance(bhn, mx.array) and bhn.shape == (w_h.shape[1],)


def _is_step(x):
    """Length 1 (a streaming step): ``ops/streaming.py`` for a plain call,
    stock's code otherwise; the sequence machinery only costs there (measured
    on the H100)."""
    return x.ndim >= 2 and x.shape[-2] == 1


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
