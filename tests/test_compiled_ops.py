"""The compiled dispatch of the functional ops (``ops.recurrent._dispatch``).

On CUDA, where the whole-sequence kernels take a call, ``ops.gru/lstm/rnn/slstm`` run
their graph through ``mx.compile`` (one trace per input signature). Here, on the CPU,
the dispatch is forced (``gpu_target`` and ``_kernels_take`` stubbed) so that the same
op runs compiled on the CPU step loop. Forward calls (no transform: the compiled graph
is replayed) must equal the op run directly, for every combination of arrays given or
None, on new weights and inputs each call; under ``value_and_grad`` (MLX then runs the
function itself) the value and every gradient too. A compiled entry must have been made,
so a dispatch that silently stopped compiling fails.
"""

import dataclasses

import pytest

import mlx.core as mx
import mlx.nn as nn

import mlx_fastrnn
from mlx_fastrnn.ops import recurrent as R


@pytest.fixture
def forced(monkeypatch):
    """The dispatch as on CUDA where the kernels take every call (the ops then run the
    CPU's steps)."""
    monkeypatch.setattr(R, "gpu_target", lambda: "cuda")
    monkeypatch.setattr(R, "default_steps", lambda cell, whole_sequence=True: cell.compiled_steps)
    monkeypatch.setattr(R, "_kernels_take", lambda *a: True)
    monkeypatch.setattr(R, "_COMPILED", {})
    return R


def _layer(kind, H):
    if kind == "slstm":
        return mlx_fastrnn.SLSTM(5, H, num_heads=1)
    if kind == "rnn_relu":
        return mlx_fastrnn.RNN(5, H, nonlinearity=nn.relu)
    return {"gru": mlx_fastrnn.GRU, "lstm": mlx_fastrnn.LSTM, "rnn": mlx_fastrnn.RNN}[kind](5, H)


def _states(kind, B, H, given):
    n = {"lstm": 2, "slstm": 4}.get(kind, 1)
    shape = (B, H) if B else (H,)
    states = [mx.random.normal(shape) * 0.5 if g else None for g in given[:n]]
    if kind == "slstm" and any(given):  # m: a finite stabilizer
        states[3] = mx.zeros_like(states[3])
    return states


def _call(m, kind, x, states):
    if kind == "lstm":
        return m(x, *states)
    if kind == "slstm":  # one head as a dense W_h [4H, H] (the layer passes R [4, 1, H, H]: not compiled)
        w_h = m._recurrent().reshape(-1, m._recurrent().shape[-1])
        return R.slstm(x, m.Wx, w_h, m.get("bias"), None if states[0] is None else tuple(states))
    return m(x, states[0])


def _value_and_grads(m, kind, x, states):
    def loss(params, x, states):
        m.update(params)
        out = _call(m, kind, x, states)
        outs = out if isinstance(out, tuple) else (out,)
        return sum((o * mx.cos(mx.arange(o.size).reshape(o.shape))).sum() for o in outs)

    given = [s for s in states if s is not None]
    fn = mx.value_and_grad(lambda p, x, *g: loss(p, x, _refill(states, g)), argnums=(0, 1, *range(2, 2 + len(given))))
    value, grads = fn(m.trainable_parameters(), x, *given)
    mx.eval(value, grads)
    return value, grads


def _refill(states, given):
    it = iter(given)
    return [next(it) if s is not None else None for s in states]


def _flat(tree):
    from mlx.utils import tree_flatten

    return [a for _, a in tree_flatten(tree)]


def _fresh(m, scale):
    """New parameter arrays (other values) in ``m``: a replay must read them, not the trace's."""
    from mlx.utils import tree_map

    m.update(tree_map(lambda p: p * scale + 0.01, m.parameters()))


H, L = 6, 4  # hidden size and length of the parametrized cases


def _inputs(kind, batch, given):
    """x [batch, L, 5] (unbatched when ``batch`` is None) and the states given."""
    return mx.random.normal((batch, L, 5) if batch else (L, 5)), _states(kind, batch, H, given)


CASES = [
    ("gru", (False,)), ("gru", (True,)), ("lstm", (False, False)), ("lstm", (True, True)), ("lstm", (True, False)),
    ("lstm", (False, True)), ("rnn", (False,)), ("rnn", (True,)), ("rnn_relu", (True,)),
    ("slstm", (False,) * 4), ("slstm", (True,) * 4),
]


@pytest.mark.parametrize("batch", [3, None])
@pytest.mark.parametrize("kind,given", CASES)
def test_compiled_forward_replays_match_direct(forced, monkeypatch, kind, given, batch):
    """Three forward calls (one trace, two replays) on new weights and inputs each time."""
    mx.random.seed(11)
    m = _layer(kind, H)
    for call in range(3):
        _fresh(m, 0.9 + 0.1 * call)
        x, states = _inputs(kind, batch, given)
        monkeypatch.delenv("MLX_FASTRNN_COMPILE", raising=False)
        got = _call(m, kind, x, states)
        monkeypatch.setenv("MLX_FASTRNN_COMPILE", "0")
        want = _call(m, kind, x, states)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert mx.allclose(a, b, rtol=1e-6, atol=1e-6).item(), (call, mx.abs(a - b).max())
    entries = list(R._COMPILED.values())
    assert len(entries) == 1 and len(entries[0][1]) == 1  # one trace, replayed


@pytest.mark.parametrize("batch", [3, None])
@pytest.mark.parametrize("kind,given", CASES)
def test_compiled_op_value_and_grads_match_direct(forced, monkeypatch, kind, given, batch):
    mx.random.seed(7)
    m = _layer(kind, H)
    x, states = _inputs(kind, batch, given)
    value_c, grads_c = _value_and_grads(m, kind, x, states)
    assert R._COMPILED, "the forced dispatch made no compiled entry"
    monkeypatch.setenv("MLX_FASTRNN_COMPILE", "0")
    value_d, grads_d = _value_and_grads(m, kind, x, states)
    assert mx.allclose(value_c, value_d, rtol=1e-5, atol=1e-5).item()
    flat_c, flat_d = _flat(grads_c), _flat(grads_d)
    assert len(flat_c) == len(flat_d)
    for a, b in zip(flat_c, flat_d):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()


def test_compiled_entries_per_given_pattern_and_choice_key(forced, monkeypatch):
    m = mlx_fastrnn.LSTM(5, 4)
    x = mx.random.normal((2, 3, 5))
    mx.eval(m(x), m(x), m(x, mx.zeros((2, 4))))
    assert len(R._COMPILED) == 2  # (none given), (hidden given); the repeat call reuses its entry
    monkeypatch.setattr(R, "kernel_choice_key", lambda: ("another table", None))
    mx.eval(m(x))
    assert len(R._COMPILED) == 3  # a different kernel choice key traces anew


def test_ops_of_one_pattern_keep_their_own_traces(forced, monkeypatch):
    """A GRU and an LSTM call with the same arrays-given pattern and shapes: each its own
    compiled entry (the core is in the key), each equal to its direct run."""
    x, h, c = mx.random.normal((2, 3, 5)), mx.random.normal((2, 4)), mx.random.normal((2, 4))
    gru, lstm = mlx_fastrnn.GRU(5, 4), mlx_fastrnn.LSTM(5, 4)
    # GRU (b, bhn, hidden) and LSTM (bias, hidden, cell): all given, one pattern
    got = (gru(x, h), lstm(x, h, c)[1], gru(x, h))
    assert len(R._COMPILED) == 2
    monkeypatch.setenv("MLX_FASTRNN_COMPILE", "0")
    want = (gru(x, h), lstm(x, h, c)[1], gru(x, h))
    for a, b in zip(got, want):
        assert mx.allclose(a, b, rtol=1e-6, atol=1e-6).item()


def test_kernel_source_switches_are_in_the_key(forced, monkeypatch):
    m = mlx_fastrnn.RNN(5, 4)
    x = mx.random.normal((2, 3, 5))
    mx.eval(m(x))
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_SWITCHES", "no_prefetch")
    mx.eval(m(x))
    assert len(R._COMPILED) == 2


def test_signatures_per_entry_are_capped(forced, monkeypatch):
    """Past ``MAX_SIGNATURES`` input signatures (here 2 sequence lengths) a compiled op
    runs directly: no further trace, the same result."""
    monkeypatch.setattr(R, "MAX_SIGNATURES", 2)
    m = mlx_fastrnn.GRU(5, 4)
    outs = [m(mx.random.normal((2, L, 5))) for L in (2, 3, 4, 2)]
    (fn, signatures), = R._COMPILED.values()
    assert sorted(sig[0][0][1] for sig in signatures) == [2, 3]
    assert outs[2].shape == (2, 4, 4)


def test_kernels_are_asked_with_a_float32_w_h(monkeypatch):
    """The recurrence gets W_h in float32 whatever the layer's dtype, so the kernels are
    asked about a float32 W_h (they decline any other): a bfloat16 layer compiles too."""
    asked = []

    def accepts(xp, w_h, **kw):
        asked.append((xp.shape, xp.dtype, w_h.shape, w_h.dtype))
        return True

    monkeypatch.setattr(R, "gpu_target", lambda: "cuda")
    monkeypatch.setattr(R, "default_steps", lambda cell, whole_sequence=True: dataclasses.replace(
        cell.compiled_steps, accepts=accepts))
    monkeypatch.setattr(R, "_COMPILED", {})
    R._kernels_take.cache_clear()
    m = mlx_fastrnn.LSTM(5, 4)
    m.set_dtype(mx.bfloat16)
    mx.eval(m(mx.random.normal((2, 3, 5)).astype(mx.bfloat16)))
    R._kernels_take.cache_clear()
    assert asked == [((3, 2, 16), mx.bfloat16, (16, 4), mx.float32)]
    assert R._COMPILED


def test_compiled_dispatch_keeps_stock_errors(forced):
    m = mlx_fastrnn.LSTM(5, 4)
    with pytest.raises(ValueError):
        m(mx.zeros((2, 3, 6)))
    with pytest.raises(ValueError):
        m(mx.zeros((2, 3, 5)), mx.zeros((2, 3)))
    assert not R._COMPILED


@pytest.mark.parametrize("value,on", [("", True), ("1", True), ("0", False), ("off", False), ("False", False)])
def test_compile_switch(monkeypatch, value, on):
    monkeypatch.setenv("MLX_FASTRNN_COMPILE", value)
    assert R.compile_enabled() is on


def test_no_compile_without_cuda_kernels(monkeypatch):
    """No compiled entry where the call runs the step loop: not CUDA, or CUDA whose
    kernels decline the call (the trace would unroll the steps)."""
    monkeypatch.setattr(R, "_COMPILED", {})
    m = mlx_fastrnn.GRU(5, 4)
    x = mx.random.normal((2, 3, 5))
    if R.gpu_target() != "cuda":
        mx.eval(m(x))
        assert not R._COMPILED
    monkeypatch.setattr(R, "gpu_target", lambda: "cuda")
    monkeypatch.setattr(R, "default_steps", lambda cell, whole_sequence=True: cell.compiled_steps)
    monkeypatch.setattr(R, "_kernels_take", lambda *a: False)
    mx.eval(m(x))
    assert not R._COMPILED
