"""Multi-head recurrent layers (FlashRNN's cells): ``SLSTM``, ``MultiHeadLSTM``,
``MultiHeadGRU``, ``MultiHeadRNN``.

The hidden state of size ``H`` is split into ``num_heads`` heads of size
``D = H / num_heads`` and the recurrent matrix is block-diagonal: head ``k``'s
gates see only head ``k``'s previous output, so the heads are independent
recurrences (``num_heads=1`` is the dense cell). The input projection is dense,
as in FlashRNN and xLSTM. Per step, with ``R_g`` the block-diagonal matrix of
gate ``g``'s head blocks ``R[g, k]`` (``[D, D]``, rows: the gate's units)::

    a_g = W_g x_t + b_g + R_g h_{t-1}

then the cell (gate orders as FlashRNN's, which for LSTM/GRU are also
PyTorch's): LSTM ``i, f, g, o``; GRU ``r, z, n`` (``n = tanh(a_n' + r (R_n h + b_hn))``,
``b_hn`` = ``bhn``); Elman ``tanh`` or ``relu``; sLSTM ``i, f, z, o`` with
states ``(y, c, n, m)``::

    lf = log_sigmoid(f) + m          m' = max(i, lf)   (m' = i for a fresh state, n = 0)
    c' = exp(lf - m') c + exp(i - m') tanh(z)
    n' = max(exp(lf - m') n + exp(i - m'), 1)        y' = sigmoid(o) c' / n'

(``cells/slstm/naive.py`` has the details: overflow cap, tie rules.)

Parameters: ``Wx`` ``[G*H, input_size]``, ``R`` ``[G, num_heads, D, D]``
(FlashRNN's layout), ``bias`` ``[G*H]`` (GRU: ``b`` ``[3H]`` and ``bhn`` ``[H]``);
initialised from U(-1/sqrt(H), 1/sqrt(H)) (``R`` from U(-1/sqrt(D), 1/sqrt(D)):
its fan-in is a head). Calls follow the drop-in layers: input ``[..., L, in]``
(batched or not), states in and every state's sequence out.

How it runs (``ops/heads.py``): the heads are independent problems. On CUDA,
of the whole-sequence kernels (each head's R block its own W_h, its own blocks
of the grid); where those decline the heads but take the dense block-diagonal
W_h (``[G*H, H]``), that; elsewhere, and on Metal and the CPU, of the step loop
with one batched matmul per step (each head's rows by its own block: 1/N of the
dense product's work), the drop-in layers' cells and fused backward.

The recurrence runs in float32 whatever the input dtype: half inputs keep a
float32 state, and float64 inputs (a CPU-only dtype in MLX) are computed in
float32 and returned as float64.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from .ops import recurrent as ops
from .ops.heads import block_diagonal  # noqa: F401 (re-exported)

_GATES = {"lstm": 4, "gru": 3, "rnn": 1, "slstm": 4}


class _MultiHead(nn.Module):
    kind = None

    def __init__(self, input_size, hidden_size, num_heads=1, bias=True):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_heads", num_heads)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {v!r}")
        if hidden_size % num_heads:
            raise ValueError(f"{type(self).__name__}: hidden_size {hidden_size} is not a multiple of "
                             f"num_heads {num_heads}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        head = hidden_size // num_heads
        gates = _GATES[self.kind]
        scale = 1.0 / math.sqrt(hidden_size)
        self.Wx = mx.random.uniform(-scale, scale, (gates * hidden_size, input_size))
        r_scale = 1.0 / math.sqrt(head)
        self.R = mx.random.uniform(-r_scale, r_scale, (gates, num_heads, head, head))
        if self.kind == "gru":
            if bias:
                self.b = mx.random.uniform(-scale, scale, (gates * hidden_size,))
                self.bhn = mx.random.uniform(-scale, scale, (hidden_size,))
        elif bias:
            self.bias = mx.random.uniform(-scale, scale, (gates * hidden_size,))

    def _extra_repr(self):
        return (f"input_dims={self.Wx.shape[1]}, hidden_size={self.hidden_size}, "
                f"num_heads={self.num_heads}, bias={'bias' in self or 'b' in self}")

    def _recurrent(self):
        return self.R  # the ops take R [G, N, D, D] as the heads' block-diagonal W_h


class MultiHeadLSTM(_MultiHead):
    """LSTM with ``num_heads`` independent heads (see the module docstring).
    ``layer(x, hidden=None, cell=None)`` returns ``(all_hidden, all_cell)`` as ``mlx.nn.LSTM``."""

    kind = "lstm"

    def __call__(self, x, hidden=None, cell=None):
        return ops.lstm(x, self.Wx, self._recurrent(), self.get("bias"), hidden, cell)


class MultiHeadGRU(_MultiHead):
    """GRU with ``num_heads`` independent heads (see the module docstring).
    ``layer(x, hidden=None)`` returns all hidden states as ``mlx.nn.GRU``."""

    kind = "gru"

    def __call__(self, x, hidden=None):
        return ops.gru(x, self.Wx, self._recurrent(), self.get("b"), self.get("bhn"), hidden)


class MultiHeadRNN(_MultiHead):
    """Elman RNN with ``num_heads`` independent heads, ``nonlinearity`` ``"tanh"``
    (default) or ``"relu"``. ``layer(x, hidden=None)`` returns all hidden states."""

    kind = "rnn"

    def __init__(self, input_size, hidden_size, num_heads=1, bias=True, nonlinearity="tanh"):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"MultiHeadRNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, num_heads, bias)
        self.nonlinearity = nonlinearity

    def __call__(self, x, hidden=None):
        return ops.rnn(x, self.Wx, self._recurrent(), self.get("bias"), hidden,
                       relu=self.nonlinearity == "relu")


class SLSTM(_MultiHead):
    """xLSTM's sLSTM with ``num_heads`` heads (see the module docstring).

    ``layer(x, states=None)`` with ``states`` None (a fresh state: zeros) or
    ``(y, c, n, m)`` (each ``[..., H]``, e.g. the last step of a previous call)
    returns the four state sequences ``(y, c, n, m)``, each ``[..., L, H]``;
    ``y`` is the layer's output.
    """

    kind = "slstm"

    def __call__(self, x, states=None):
        return ops.slstm(x, self.Wx, self._recurrent(), self.get("bias"), states)
