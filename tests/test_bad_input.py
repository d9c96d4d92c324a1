"""Bad and unusual input: ours raises what stock raises, and agrees where stock returns.

Where stock raises, both our impls must raise an ordinary ``Exception`` of the
same type (``pytest.raises(type(stock_exc))``), at call time. Where stock
returns (NaN/Inf, huge values, non-contiguous views, integer and bool input,
an empty batch), ours returns the same thing: identical NaN/Inf positions,
finite values within rtol 1e-5 / atol 1e-6 * max(1, max|finite stock|).
"""

import pytest

import mlx.core as mx

import mlx_fastrnn
from conftest import (
    KIND_NAMES,
    assert_all_close,
    assert_allclose,
    assert_close,
    forward,
    forward_and_grads,
    is_lstm,
    make_pair,
    rand,
    unravel_index,
)

D, H = 4, 6

# name -> (x, hidden, cell, lstm_only); everything else is well formed.
BAD = {
    "feature_size": lambda: (mx.zeros((2, 3, D + 1)), None, None),
    "feature_size_unbatched": lambda: (mx.zeros((3, D - 1)), None, None),
    "hidden_width": lambda: (mx.zeros((2, 3, D)), mx.zeros((2, H + 1)), None),
    "hidden_width_unbatched": lambda: (mx.zeros((3, D)), mx.zeros((H - 1,)), None),
    "hidden_batch": lambda: (mx.zeros((2, 3, D)), mx.zeros((3, H)), None),
    "hidden_0d": lambda: (mx.zeros((2, 3, D)), mx.array(0.0), None),
    "input_1d": lambda: (mx.zeros((D,)), None, None),
    "input_0d": lambda: (mx.array(1.0), None, None),
    "empty_sequence": lambda: (mx.zeros((2, 0, D)), None, None),
    "empty_sequence_unbatched": lambda: (mx.zeros((0, D)), None, None),
    "empty_sequence_hidden": lambda: (mx.zeros((2, 0, D)), mx.zeros((2, H)), None),
    "cell_width": lambda: (mx.zeros((2, 3, D)), None, mx.zeros((2, H + 1))),
    "cell_width_with_hidden": lambda: (mx.zeros((2, 3, D)), mx.zeros((2, H)), mx.zeros((2, H - 1))),
    "cell_batch": lambda: (mx.zeros((2, 3, D)), mx.zeros((2, H)), mx.zeros((3, H))),
    "cell_batch_no_hidden": lambda: (mx.zeros((2, 3, D)), None, mx.zeros((3, H))),
    # stock broadcasts these cells (f * cell): it returns, so ours must too
    "cell_0d": lambda: (mx.zeros((2, 3, D)), None, mx.array(0.5)),
    "cell_last_dim_1": lambda: (mx.zeros((2, 3, D)), mx.zeros((2, H)), mx.full((2, 1), 0.5)),
    # stock raises for these with LSTM/RNN (addmm output takes hidden's batch shape)
    # but returns for GRU; either way ours must do the same
    "hidden_1H_over_N": lambda: (mx.zeros((2, 3, D)), mx.zeros((1, H)), None),
    "hidden_H_over_N": lambda: (mx.zeros((2, 3, D)), mx.zeros((H,)), None),
}
LSTM_ONLY = {k for k in BAD if k.startswith("cell")}

CASES = [(k, c) for k in KIND_NAMES for c in BAD if is_lstm(k) or c not in LSTM_ONLY]


def _stock_outcome(stock, x, hidden, cell):
    try:
        out = forward(stock, x, hidden, cell)
        return None, out
    except Exception as e:  # noqa: BLE001
        return e, None


@pytest.mark.parametrize("kind,case", CASES, ids=[f"{k}-{c}" for k, c in CASES])
def test_same_error_or_same_result_as_stock(kind, case):
    stock, ours = make_pair(kind, D, H)
    x, hidden, cell = BAD[case]()
    exc, ref = _stock_outcome(stock, x, hidden, cell)
    for impl in ("legacy", "fast"):
        if exc is not None:
            with pytest.raises(type(exc)) as info:
                with mlx_fastrnn.use_impl(impl):
                    out = ours(x, hidden, cell) if is_lstm(kind) else ours(x, hidden)
                mx.eval(out)
            assert isinstance(info.value, Exception)
            assert str(info.value), "the error must say what is wrong"
        else:
            out = forward(ours, x, hidden, cell, impl=impl)
            for a, b in zip(out, ref):
                assert_close(a, b, f"{impl} {case}")


@pytest.mark.parametrize("what", ["numpy_float32", "python_list"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_non_mlx_input_same_error_as_stock(kind, what):
    stock, ours = make_pair(kind, D, H)
    x = rand((2, 3, D), 0).tolist()  # float32 values as a nested Python list
    if what == "numpy_float32":
        np = pytest.importorskip("numpy")
        x = np.array(x, dtype=np.float32)
    exc, ref = _stock_outcome(stock, x, None, None)
    for impl in ("legacy", "fast"):
        if exc is not None:
            with pytest.raises(type(exc)):
                forward(ours, x, impl=impl)
        else:
            for a, b in zip(forward(ours, x, impl=impl), ref):
                assert_close(a, b, f"{impl} {what}")


# --------------------------------------------------------------------------- stock returns

def _assert_same_positions(mask_a, mask_b, what):
    """Like ``assert_array_equal(mask_a, mask_b)`` for boolean masks of one shape."""
    differ = mask_a != mask_b
    if mx.any(differ).item():
        flat = [i for i, d in enumerate(differ.flatten().tolist()) if d]
        shape = tuple(differ.shape)
        first = [unravel_index(i, shape) for i in flat[:5]]
        raise AssertionError(
            f"{what}: at {len(flat)} of {differ.size} elements, first at indices {first} "
            f"(actual {[mask_a[i].item() for i in first]}, expected {[mask_b[i].item() for i in first]})")


def _assert_same_nonfinite(a, b, name):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    _assert_same_positions(mx.isnan(a), mx.isnan(b), f"{name}: NaN positions differ")
    _assert_same_positions(mx.isposinf(a), mx.isposinf(b), f"{name}: +Inf positions differ")
    _assert_same_positions(mx.isneginf(a), mx.isneginf(b), f"{name}: -Inf positions differ")
    fin = mx.isfinite(b)
    if mx.any(fin).item():
        scale = max(1.0, mx.where(fin, mx.abs(b), 0.0).max().item())
        assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale, name=name, where=fin)


def _special_input(which):
    x = rand((3, 5, D), 50)  # float32
    if which == "nan":
        x[0, 1, 2] = float("nan")
        x[2, 3, :] = float("nan")
    elif which == "inf":
        x[0, 1, 2] = float("inf")
        x[1, 0, 1] = -float("inf")
        x[2, 4, 3] = float("inf")
    elif which == "nan_and_inf":
        x[0, 2, 0] = float("nan")
        x[1, 1, 1] = float("inf")
    elif which == "x1e4":
        x = x * 1e4
    elif which == "1e30":
        x = mx.sign(x) * 1e30
    elif which == "1e30_one_row":
        x[1, 2, :] = 1e30
    assert x.dtype == mx.float32
    mx.eval(x)
    return x


@pytest.mark.parametrize("which", ["nan", "inf", "nan_and_inf", "x1e4", "1e30", "1e30_one_row"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_special_values_match_stock(kind, which):
    stock, ours = make_pair(kind, D, H)
    x = _special_input(which)
    hidden = rand((3, H), 51, scale=0.5)
    for h in (None, hidden):
        c = h if is_lstm(kind) else None
        ref = forward(stock, x, h, c)
        out = forward(ours, x, h, c, impl="fast")
        for i, (a, b) in enumerate(zip(out, ref)):
            _assert_same_nonfinite(a, b, f"{kind} {which} hidden={h is not None} output[{i}]")
            if which.startswith("x1e4") or which.startswith("1e30"):
                assert not mx.any(mx.isnan(a) & mx.isfinite(b)).item(), "NaN where stock is finite"


@pytest.mark.parametrize("which", ["nan_hidden", "inf_hidden"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_special_values_in_state_match_stock(kind, which):
    stock, ours = make_pair(kind, D, H)
    x = rand((3, 4, D), 52)
    h = rand((3, H), 53)
    h[1, 2] = float("nan") if which == "nan_hidden" else float("inf")
    mx.eval(h)
    c = h if is_lstm(kind) else None
    ref = forward(stock, x, h, c)
    out = forward(ours, x, h, c, impl="fast")
    for i, (a, b) in enumerate(zip(out, ref)):
        _assert_same_nonfinite(a, b, f"{kind} {which} output[{i}]")


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_huge_inputs_gradients_finite_where_stock_finite(kind):
    stock, ours = make_pair(kind, D, H)
    x = _special_input("x1e4")
    out_s, g_s = forward_and_grads(stock, x)
    out_f, g_f = forward_and_grads(ours, x, impl="fast")
    for k in g_s:
        _assert_same_nonfinite(g_f[k], g_s[k], f"{kind} x*1e4 grad {k}")


def _contiguous_copy(a):
    """A fresh, row-contiguous array with ``a``'s values (a host round trip)."""
    return mx.array(a.tolist(), dtype=a.dtype)


VIEWS = {
    "swapaxes": lambda base: base.swapaxes(0, 1),          # base (L, N, D) -> (N, L, D)
    "batch_stride": lambda base: base.swapaxes(0, 1)[::2],  # every other batch element
    "time_stride": lambda base: base.swapaxes(0, 1)[:, ::2],
    "feature_stride": lambda base: mx.repeat(base.swapaxes(0, 1), 2, axis=-1)[..., ::2],
    "reversed_time": lambda base: base.swapaxes(0, 1)[:, ::-1],
    "broadcast": lambda base: mx.broadcast_to(base[:1, :1], (base.shape[1], base.shape[0], base.shape[2])),
    "transposed_unbatched": lambda base: base[:, 0, :].T.T,
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_non_contiguous_input(kind, view):
    stock, ours = make_pair(kind, D, H)
    base = rand((6, 4, D), 54)  # (L, N, D)
    x = VIEWS[view](base)
    # a transposed (non-contiguous) hidden state as well
    hbase = rand((H, x.shape[0]), 55) if x.ndim == 3 else None
    h = hbase.T if hbase is not None else None
    c = h if (is_lstm(kind) and h is not None) else None
    x_copy = _contiguous_copy(x)
    out_s, g_s = forward_and_grads(stock, x_copy, None if h is None else _contiguous_copy(h),
                                   None if c is None else _contiguous_copy(c))
    out_f, g_f = forward_and_grads(ours, x, h, c, impl="fast")
    assert_all_close(out_f, g_f, out_s, g_s, what=f"{kind} {view}")


@pytest.mark.parametrize("dtype", [mx.int32, mx.int8, mx.uint8, mx.bool_], ids=["int32", "int8", "uint8", "bool"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_integer_and_bool_input(kind, dtype):
    stock, ours = make_pair(kind, D, H)
    x = mx.random.randint(0, 3, (2, 4, D), key=mx.random.key(1)).astype(dtype)
    ref = forward(stock, x)
    for impl in ("legacy", "fast"):
        out = forward(ours, x, impl=impl)
        for a, b in zip(out, ref):
            assert a.dtype == b.dtype
            assert_close(a, b, f"{impl} {dtype}")


EMPTY_BATCH = {
    "N0_L3": ((0, 3, D), None),
    "N0_L1": ((0, 1, D), None),
    "N0_L3_hidden": ((0, 3, D), (0, H)),
    "lead_2x0_L3": ((2, 0, 3, D), None),
}


@pytest.mark.parametrize("case", list(EMPTY_BATCH))
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_empty_batch(kind, case):
    """A batch of size 0 (any sequence length): stock returns empty outputs."""
    xs, hs = EMPTY_BATCH[case]
    stock, ours = make_pair(kind, D, H)
    x = mx.zeros(xs)
    h = None if hs is None else mx.zeros(hs)
    c = h if is_lstm(kind) else None
    exc, ref = _stock_outcome(stock, x, h, c)
    assert exc is None, f"stock raised {exc!r}"
    for impl in ("legacy", "fast"):
        out = forward(ours, x, h, c, impl=impl)
        assert len(out) == len(ref)
        for a, b in zip(out, ref):
            assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("shape", [(1,), ()], ids=["1", "scalar"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_bias_that_broadcasts_same_as_stock(kind, shape, length):
    """A bias replaced by one that only broadcasts (stock's addmm takes it): the same
    outputs and gradients, each of its parameter's shape (an optimizer step must not
    change a parameter's shape), on every path (the sequence, a streaming step)."""
    stock, ours = make_pair(kind, D, H)
    for layer in (stock, ours):
        if kind == "gru":
            layer.b = mx.full(shape, 0.1)
            layer.bhn = mx.full(shape, -0.2)
        else:
            layer.bias = mx.full(shape, 0.1)
    x = rand((3, length, D), 7)
    ref_out, ref_grads = forward_and_grads(stock, x)
    for impl in ("legacy", "fast"):
        out, grads = forward_and_grads(ours, x, impl=impl)
        assert_all_close(out, grads, ref_out, ref_grads, impl)
        for k, g in grads.items():
            assert g.shape == ref_grads[k].shape, (impl, k, g.shape, ref_grads[k].shape)


@pytest.mark.parametrize("batched", [False, True])
def test_rnn_step_nonlinearity_sees_stock_shapes(batched):
    """RNN's ``nonlinearity`` may be any callable, and stock calls it on a step's
    [..., H] slice: a length-1 call without a hidden state must too (an axis-0 softmax
    gives other numbers on [..., 1, H])."""
    seen = []

    def act(v):
        seen.append(v.shape)
        return mx.softmax(v, axis=0)

    stock, ours = make_pair("rnn_tanh", D, H, nonlinearity=act)
    x = rand((2, 1, D) if batched else (1, D), 3)
    ref = forward(stock, x)
    stock_shapes, seen[:] = list(seen), []
    for impl in ("legacy", "fast"):
        (out,) = forward(ours, x, impl=impl)
        assert out.shape == ref[0].shape
        assert_close(out, ref[0], impl)
        assert seen == stock_shapes, (impl, seen, stock_shapes)
        seen.clear()
