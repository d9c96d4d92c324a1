"""FlashRNN-compatible recurrences on MLX: :func:`flashrnn`.

The argument layouts and results of FlashRNN 1.0.8's ``flashrnn(Wx, R, b,
states, function, backend="vanilla")`` with its default shapes (input
"BTGHD", recurrent "GHDP", bias "GHD", states and outputs "SBTHD"), the same
numbers as its vanilla backend (``flashrnn/vanilla/*.py``). This is the
reference: a plain time loop in MLX ops, differentiable by MLX autodiff
w.r.t. Wx, R, b and states.

FlashRNN's conventions, as read from its vanilla sources:

- R per head maps the previous state to the gates as ``R @ y``: ``R[g, n]`` is
  [D_out, D_in], ``Ry[b, g, n, d] = sum_p R[g, n, d, p] y[b, n, p]`` (vanilla
  permutes R "GHDP" -> "HPGD" and computes ``y[n] (B x P) @ R[n] (P x G*D)``).
- The pre-activations are ``Wx + Ry + b`` per gate; only the output ``y``
  (state 0) recurs through R.
- Gate orders: LSTM i, f, z, o (c' = f c + i tanh z, y' = o tanh c'); Elman one
  gate (y' = tanh); sLSTM i, f, z, o (see cells/slstm/naive.py); GRU: Wx has
  (r, z, n), R has (g, r, z), b has (g, r, z, n), and
  ``y' = z y + (1 - z) tanh(Wx_n + b_n + r (Ry_g + b_g))`` with
  ``r = sigmoid(Wx_r + Ry_r + b_r)``, ``z = sigmoid(Wx_z + Ry_z + b_z)``: the
  candidate's recurrent part (bias included) gated by r after the matmul, as
  torch's GRU does (so it is our GRU cell with bhn = b_g).
- sLSTM's initial-state special case: vanilla takes ``m' = i_raw`` when
  ``torch.all(n == 0)`` over the WHOLE state tensor (every batch row, head and
  unit), ``max(i_raw, lf)`` everywhere otherwise; so do we (the sLSTM cell
  tests per element, as FlashRNN's kernels do: the same whenever n is all zero
  or nowhere zero, e.g. from the second step on, where n >= 1).
- Ties of a max split the cotangent in half (torch's rule); see
  cells/slstm/naive.py, which also has the one deliberate difference: a fresh
  sLSTM step caps its forget gate at e^88 where vanilla's overflows to inf
  (and its zero state to NaN).

States and accumulation are float32 whatever the input dtypes (vanilla keeps
them in Wx's dtype); the results have Wx's dtype. Where the heads run on the
tiled whole-sequence kernels (CUDA), the fused backend takes a half ``Wx``'s
pre-activations ``Wx + b`` in Wx's dtype (the bias added in float32, one
rounding), as the multi-head layers' own input projections come: the recurrent
product then runs in that type (bfloat16 / float16 tensor cores, half the weight
and input bytes) instead of TF32, 1.2-2x faster bfloat16 calls at B = 64 with
N*D >= 1024 on the H200. On the resident class a float32 operand measured faster
(0.59-0.97x as fast with bfloat16 there, 2026-12-04), and elsewhere nothing runs a half
product: float32 there (benchmarks/RESULTS.md). With the half operand the
cotangent of ``Wx + b`` comes back in Wx's dtype, so the bias gradient sums those
rounded values (in float32).
"""

import mlx.core as mx

from ..cells import GRU_CELL, LSTM_CELL, RNN_TANH_CELL, SLSTM_CELL
from ..cells.gru import naive as gru_naive
from ..cells.lstm import naive as lstm_naive
from ..cells.rnn import naive as rnn_naive
from ..cells.slstm import naive as slstm_naive

from .heads import block_diagonal, forward_class, head_recurrence
from .recurrent import default_steps

__all__ = ["flashrnn", "FUNCTIONS", "BACKENDS", "block_diagonal"]

# "fused": the drop-in layers' recurrence driver (persistent kernels on CUDA,
# step kernels on Metal, compiled cells on the CPU; fused backward) on the
# dense form of the block-diagonal R. "vanilla": the reference time loop below
# (FlashRNN's backend of that name, step for step).
BACKENDS = ("fused", "vanilla")


# Each function maps the step's (Wx + b, Ry, b) in head-major layout
# ([N, B, G, D]; b [N, 1, Gb, D]) to a cell's reference step.

def _lstm(xb, ry, b, states):
    return lstm_naive.forward_step(_flat(xb), _flat(ry), states, ())


def _elman(xb, ry, b, states):
    return rnn_naive.forward_step(_flat(xb), _flat(ry), states, ())


def _gru(xb, ry, b, states):
    # xb = Wx + b[r, z, n]; ry comes in (r, z, g) order (R is permuted once, in
    # flashrnn); the GRU cell's bhn is b_g, added to Ry_g before r scales it.
    return gru_naive.forward_step(_flat(xb), _flat(ry), states, (b[:, :, 0],))


def _slstm(xb, ry, b, states):
    return slstm_naive.step(_flat(xb), _flat(ry), states, mx.all(states[2] == 0))


def _flat(a):
    """[N, B, G, D] -> [N, B, G*D]: the cells' gate blocks."""
    return a.reshape(*a.shape[:2], -1)


class _Function:
    def __init__(self, gates_x, gates_r, gates_b, num_states, step, cell, r_order=None):
        self.gates_x, self.gates_r, self.gates_b = gates_x, gates_r, gates_b
        self.num_states, self.step, self.cell = num_states, step, cell
        self.r_order = r_order  # R's gates reordered to the cell's hp order
        # b's gates that go with Wx's (GRU: b has one more, the candidate's recurrent bias)
        self.b_x = slice(gates_b - gates_x, gates_b)


FUNCTIONS = {
    "lstm": _Function(4, 4, 4, 2, _lstm, LSTM_CELL),
    "gru": _Function(3, 3, 4, 1, _gru, GRU_CELL, r_order=[1, 2, 0]),
    "elman": _Function(1, 1, 1, 1, _elman, RNN_TANH_CELL),
    "slstm": _Function(4, 4, 4, 4, _slstm, SLSTM_CELL),
}


def flashrnn(Wx, R, b, states=None, function="lstm", backend="fused"):
    """Run a FlashRNN recurrence.

    Args:
        Wx: [B, T, Gx, N, D] input pre-activations (``x W^T`` per gate and head).
        R: [Gr, N, D, D] recurrent weights, ``R[g, n] @ y_head`` (rows: gate units).
        b: [Gb, N, D] biases.
        states: [S, B, 1, N, D] initial states (zeros when None).
        function: "lstm" (Gx, Gr, Gb, S = 4, 4, 4, 2; states y, c), "gru"
            (3, 3, 4, 1), "elman" (1, 1, 1, 1), "slstm" (4, 4, 4, 4; y, c, n, m).
        backend: "fused" (default) or "vanilla" (see ``BACKENDS``). An sLSTM
            with given states runs "vanilla": its fresh-state test is over the
            whole state tensor, the fused cell's per element (they differ only
            for a partly zero normalizer).

    Returns:
        ``(states_seq [S, B, T, N, D], last_states [S, B, 1, N, D])`` in Wx's dtype.
    """
    fn = FUNCTIONS.get(function)
    if fn is None:
        raise ValueError(f"flashrnn: unknown function {function!r}; expected one of {sorted(FUNCTIONS)}")
    if backend not in BACKENDS:
        raise ValueError(f"flashrnn: unknown backend {backend!r}; expected one of {BACKENDS}")
    batch, length, heads, dim = _check_shapes(fn, function, Wx, R, b, states)
    if backend == "fused" and length > 0 and (function != "slstm" or states is None):
        return _fused(fn, Wx, R, b, states, batch, length, heads, dim)
    f32 = mx.float32
    # Head-major internally ([N, B, ...]): the per-head matmul needs no transpose per step.
    b = b.astype(f32).transpose(1, 0, 2)[:, None]  # [N, 1, Gb, D]
    xb = Wx.astype(f32).transpose(1, 3, 0, 2, 4) + b[None, :, :, fn.b_x]  # [T, N, B, Gx, D]
    r = R.astype(f32)
    if fn.r_order is not None:
        r = r[mx.array(fn.r_order)]
    # [Gr, N, D, P] -> [N, P, Gr*D]: y[n] [B, P] @ r_t[n] gives Ry[n] [B, Gr*D].
    r_t = r.transpose(1, 3, 0, 2).reshape(heads, dim, fn.gates_r * dim)
    if states is None:
        state = tuple(mx.zeros((heads, batch, dim), f32) for _ in range(fn.num_states))
    else:
        s = states.astype(f32)[:, :, 0].transpose(0, 2, 1, 3)  # [S, N, B, D]
        state = tuple(s[i] for i in range(fn.num_states))
    seqs = [[] for _ in range(fn.num_states)]
    for t in range(length):
        ry = (state[0] @ r_t).reshape(heads, batch, fn.gates_r, dim)
        state = tuple(fn.step(xb[t], ry, b, state))
        for seq, a in zip(seqs, state):
            seq.append(a)
    last = mx.stack(state).transpose(0, 2, 1, 3)[:, :, None]  # [S, B, 1, N, D]
    if length:
        seq = mx.stack([mx.stack(q, axis=1) for q in seqs])  # [S, N, T, B, D]
        seq = seq.transpose(0, 3, 2, 1, 4)
    else:
        seq = mx.zeros((fn.num_states, batch, 0, heads, dim), f32)
    return seq.astype(Wx.dtype), last.astype(Wx.dtype)


def _fused(fn, Wx, R, b, states, batch, length, heads, dim):
    """flashrnn on the recurrence driver: the heads as independent problems
    (``ops/heads.py``), their pre-activations ``Wx + b`` head-major [T, N, B, G*D]
    (the kernels' row order) in one pass over Wx, and each state sequence from the
    kernels' [T, N, B, D] to FlashRNN's [B, T, N, D] in one more."""
    hidden = heads * dim
    f32 = mx.float32
    b = b.astype(f32)
    r = R.astype(f32)
    if fn.r_order is not None:  # GRU: R (g, r, z) -> the cell's (r, z, n); b_g is the cell's bhn
        r = r[mx.array(fn.r_order)]
    x_bias, r_bias = b[fn.b_x], b[0] if fn.r_order is not None else None
    if states is None:
        # A zero state skips step 0's product (no array), but vanilla computes 0 @ R: NaN
        # in the rows where R holds a NaN or an inf. Those rows' bias takes the same NaN
        # (0 * R summed over a row: exactly 0 where the row is finite, NaN where it is not).
        nonfinite = (r * 0).sum(axis=-1)  # [Gr, N, D], the cell's gate order
        if r_bias is not None:  # GRU: the candidate's part goes with bhn, inside r * (...)
            x_bias = x_bias + mx.concatenate([nonfinite[:2], mx.zeros_like(nonfinite[:1])])
            r_bias = r_bias + nonfinite[2]
        else:
            x_bias = x_bias + nonfinite
    params = () if r_bias is None else (r_bias.reshape(hidden),)
    # the bias added in float32 (as the reference); rounded once to a half Wx's dtype where
    # the tiled kernels then run a half product (module docstring)
    steps = default_steps(fn.cell)
    half = Wx.dtype in (mx.bfloat16, mx.float16) and forward_class(
        fn.cell, steps, length, batch, fn.gates_x, heads, dim, Wx.dtype) == "tiled"
    xh = (_head_major_preactivations_half if half else _head_major_preactivations)(Wx, x_bias)
    if states is None:
        states0 = (None,) * fn.num_states  # zero: no array (ops.sequence.recurrence)
        given = (False,) * fn.num_states
    else:
        s = states.astype(f32).reshape(fn.num_states, batch, hidden)
        states0 = tuple(s[i] for i in range(fn.num_states))
        given = (True,) * fn.num_states
    seqs = head_recurrence(fn.cell, steps, xh, r, states0, params, given, head_major=True)
    seq = mx.stack([_flashrnn_layout(q, Wx.dtype) for q in seqs])  # [S, B, T, N, D]
    # From the float32 states, so that the cotangents of seq and last meet in float32
    # (as they did before the cast); an index, not the slice q[-1:]: for T = 1 that
    # slice IS q (MLX returns the array itself), and a VJP keeps one cotangent per array.
    last = mx.stack([q[-1] for q in seqs]).transpose(0, 2, 1, 3)[:, :, None]  # [S, B, 1, N, D]
    return seq, last.astype(Wx.dtype)


def _preactivations(Wx, x_bias, half=False):
    """``Wx`` [B, T, G, N, D] + ``x_bias`` [G, N, D], added in float32, as [T, N, B, G*D]
    in float32 (``half``: in Wx's dtype): one kernel reading Wx (compiled: the casts,
    the add and the transposed write fuse)."""
    batch, length, gates, heads, dim = Wx.shape
    xh = Wx.transpose(1, 3, 0, 2, 4).astype(mx.float32) + x_bias.transpose(1, 0, 2)[None, :, None]
    if half:
        xh = xh.astype(Wx.dtype)
    return xh.reshape(length, heads, batch, gates * dim)


_head_major_preactivations = mx.compile(_preactivations)
_head_major_preactivations_half = mx.compile(lambda Wx, x_bias: _preactivations(Wx, x_bias, half=True))


def _flashrnn_layout(seq, dtype):
    """A state sequence [T, N, B, D] (float32) as FlashRNN's [B, T, N, D] in ``dtype``
    (one compiled kernel for the half types: the transposed read and the cast fuse; for
    float32 a view, which the caller's stack copies once)."""
    if dtype == mx.float32:
        return seq.transpose(2, 0, 1, 3)
    cast = _TRANSPOSE_CAST.get(dtype)
    return cast(seq) if cast is not None else seq.transpose(2, 0, 1, 3).astype(dtype)


_TRANSPOSE_CAST = {
    mx.bfloat16: mx.compile(lambda seq: seq.transpose(2, 0, 1, 3).astype(mx.bfloat16)),
    mx.float16: mx.compile(lambda seq: seq.transpose(2, 0, 1, 3).astype(mx.float16)),
}


def _check_shapes(fn, function, Wx, R, b, states):
    """(B, T, N, D) after checking every layout; ValueError naming the expected one."""
    where = f"flashrnn(function={function!r})"
    for name, a in (("Wx", Wx), ("R", R), ("b", b), ("states", states)):
        if a is None and name == "states":
            continue
        if not isinstance(a, mx.array):
            raise ValueError(f"{where}: {name} must be an mlx array, got {type(a).__name__}")
        if not mx.issubdtype(a.dtype, mx.floating):
            raise ValueError(f"{where}: {name} must be floating point, got {a.dtype}")
    if Wx.ndim != 5 or Wx.shape[2] != fn.gates_x:
        raise ValueError(f"{where}: Wx must be [B, T, Gx={fn.gates_x}, N, D], got shape {tuple(Wx.shape)}")
    batch, length, _, heads, dim = Wx.shape
    expected = {
        "R": ((fn.gates_r, heads, dim, dim), f"[Gr={fn.gates_r}, N={heads}, D={dim}, D={dim}]"),
        "b": ((fn.gates_b, heads, dim), f"[Gb={fn.gates_b}, N={heads}, D={dim}]"),
        "states": ((fn.num_states, batch, 1, heads, dim),
                   f"[S={fn.num_states}, B={batch}, 1, N={heads}, D={dim}]"),
    }
    for name, a in (("R", R), ("b", b), ("states", states)):
        shape, layout = expected[name]
        if a is not None and tuple(a.shape) != shape:
            raise ValueError(f"{where}: {name} must be {layout} (from Wx's [B, T, Gx, N, D] = "
                             f"{tuple(Wx.shape)}), got shape {tuple(a.shape)}")
    if batch < 1 or heads < 1 or dim < 1:
        raise ValueError(f"{where}: Wx [B, T, Gx, N, D] needs B, N, D >= 1, got {tuple(Wx.shape)}")
    return batch, length, heads, dim
