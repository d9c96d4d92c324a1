"""Fast path vs legacy (stock mlx.nn) parity for GRU, LSTM, RNN(tanh), RNN(relu).

Each case builds one stock layer and one of ours with identical weights, runs
ours under ``use_impl("fast")`` and under ``use_impl("legacy")``, and compares
the outputs and the gradients of a random linear loss with respect to ``x``,
every parameter (``Wx, Wh, b, bhn`` / ``Wx, Wh, bias`` / ``Wxh, Whh, bias``),
``hidden`` and ``cell``.

Tolerances:
  * float32 results: ``rtol = 1e-5`` and ``atol = 1e-6 * max(1, max|legacy|)``
    (absolute tolerance scaled by the magnitude of the reference array).
  * float16 / bfloat16: the fast path computes the recurrence in float32, so
    both paths are compared with a float32 stock reference built from the same
    (half-rounded) weights and inputs, and the fast path must be at least as
    close to it as legacy is, up to ``eps(dtype) * max(1, max|ref|)``
    (eps = 2**-10 for float16, 2**-7 for bfloat16); the result dtypes (outputs
    and gradients) must equal stock's.
  * Where legacy raises for a configuration, fast must raise the same type.
"""

import pytest

import mlx.core as mx

from conftest import (
    HALF_EPS,
    KIND_NAMES,
    amax,
    as_float64,
    assert_all_close,
    assert_close,
    assert_equal_bits,
    float32_copy,
    forward,
    forward_and_grads,
    is_lstm,
    make_pair,
    outcome,
    rand,
)

# id: (input_size, hidden_size, x_shape, hidden_shape | None, cell_shape | None, bias)
# ``cell_shape`` is used by LSTM only; "H" in a shape is replaced by the hidden size.
CASES = {
    "NLD":                 (4, 7, (3, 5, 4), None, None, True),
    "NLD_hidden":          (4, 7, (3, 5, 4), (3, "H"), (3, "H"), True),
    "LD":                  (3, 5, (4, 3), None, None, True),
    "LD_hidden":           (3, 5, (4, 3), ("H",), ("H",), True),
    "lead2_none":          (5, 6, (2, 3, 4, 5), None, None, True),
    "lead2_hidden":        (5, 6, (2, 3, 4, 5), (2, 3, "H"), (2, 3, "H"), True),
    "batch1":              (4, 8, (1, 6, 4), (1, "H"), (1, "H"), True),
    "len1":                (4, 6, (3, 1, 4), None, None, True),
    "len1_hidden":         (4, 6, (3, 1, 4), (3, "H"), (3, "H"), True),
    "len1_unbatched":      (4, 6, (1, 4), ("H",), ("H",), True),
    "len1_nobias_hidden":  (4, 6, (3, 1, 4), (3, "H"), (3, "H"), False),
    "len1_hidden_more_dims": (4, 6, (3, 1, 4), (2, 3, "H"), (2, 3, "H"), True),
    "H1":                  (3, 1, (2, 5, 3), (2, "H"), (2, "H"), True),
    "H7_D1":               (1, 7, (2, 4, 1), None, None, True),
    "H33":                 (10, 33, (2, 3, 10), (2, "H"), (2, "H"), True),
    "D12_H5":              (12, 5, (2, 4, 12), (2, "H"), None, True),
    "long":                (3, 4, (2, 24, 3), (2, "H"), (2, "H"), True),
    "long64_H16":          (8, 16, (2, 64, 8), (2, "H"), (2, "H"), True),
    "nobias":              (4, 7, (3, 5, 4), None, None, False),
    "nobias_hidden":       (4, 7, (3, 5, 4), (3, "H"), (3, "H"), False),
    "nobias_LD":           (3, 5, (4, 3), ("H",), None, False),
    # hidden-state batch broadcasting, exactly as stock does it (stock raises for
    # some of these for LSTM/RNN; then fast must raise the same type)
    "hidden_1H_over_N":    (4, 6, (3, 4, 4), (1, "H"), (1, "H"), True),
    "hidden_H_over_N":     (4, 6, (3, 4, 4), ("H",), ("H",), True),
    "hidden_NH_x_LD":      (4, 6, (3, 4), (2, "H"), (2, "H"), True),
    "hidden_more_dims":    (4, 6, (2, 3, 4), (3, 2, "H"), (3, 2, "H"), True),
    "hidden_more_dims_b1": (4, 6, (2, 3, 4), (3, 1, "H"), (3, 1, "H"), True),
    "x_lead_bcast_hidden": (4, 6, (2, 1, 3, 4), (2, "H"), (2, "H"), True),
    "cell_1H_over_N":      (4, 6, (3, 4, 4), (3, "H"), (1, "H"), True),
    "cell_more_dims":      (4, 6, (2, 3, 4), None, (3, 2, "H"), True),
}


def _shape(spec, hidden_size):
    return tuple(hidden_size if d == "H" else d for d in spec)


def _inputs(kind, case, seed=0):
    d, h, xs, hs, cs, bias = CASES[case]
    x = rand(xs, seed + 10)
    hidden = rand(_shape(hs, h), seed + 11, scale=0.5) if hs is not None else None
    cell = rand(_shape(cs, h), seed + 12) if (cs is not None and is_lstm(kind)) else None
    return d, h, bias, x, hidden, cell


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_parity_outputs_and_all_grads(kind, case):
    d, h, bias, x, hidden, cell = _inputs(kind, case)
    stock, ours = make_pair(kind, d, h, bias=bias)

    st, legacy_ref = outcome(lambda: forward(stock, x, hidden, cell))
    if st == "raise":
        # stock rejects this configuration: legacy and fast must reject it alike
        for impl in ("legacy", "fast"):
            with pytest.raises(type(legacy_ref)):
                forward(ours, x, hidden, cell, impl=impl)
        return

    out_l, g_l = forward_and_grads(ours, x, hidden, cell, impl="legacy")
    out_f, g_f = forward_and_grads(ours, x, hidden, cell, impl="fast")
    expected = {"x", *(f"p.{k}" for k in ("Wx", "Wh", "b", "bhn", "bias", "Wxh", "Whh"))}
    assert {k for k in g_l if k != "hidden" and k != "cell"} <= expected
    if hidden is not None:
        assert "hidden" in g_l
    if cell is not None:
        assert "cell" in g_l
    assert_all_close(out_f, g_f, out_l, g_l, what=f"{kind}/{case} fast vs legacy")


@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("shape", [(3, 5, 4), (5, 4), (2, 2, 3, 4)], ids=["NLD", "LD", "lead2"])
def test_hidden_none_equals_zeros(kind, shape):
    stock, ours = make_pair(kind, 4, 6)
    x = rand(shape, 3)
    zeros = mx.zeros((*shape[:-2], 6))
    out_none_f, g_none_f = forward_and_grads(ours, x, impl="fast")
    out_none_l, g_none_l = forward_and_grads(ours, x, impl="legacy")
    assert_all_close(out_none_f, g_none_f, out_none_l, g_none_l, what="fast(None) vs legacy(None)")

    cell = zeros if is_lstm(kind) else None
    out_zero_l, g_zero_l = forward_and_grads(ours, x, zeros, cell, impl="legacy")
    out_zero_f, g_zero_f = forward_and_grads(ours, x, zeros, cell, impl="fast")
    g_zero_l = {k: v for k, v in g_zero_l.items() if k.startswith("p.") or k == "x"}
    g_zero_f = {k: v for k, v in g_zero_f.items() if k.startswith("p.") or k == "x"}
    assert_all_close(out_none_f, g_none_f, out_zero_l, g_zero_l, what="fast(None) vs legacy(zeros)")
    assert_all_close(out_zero_f, g_zero_f, out_zero_l, g_zero_l, what="fast(zeros) vs legacy(zeros)")


@pytest.mark.parametrize("kind", ["lstm"])
@pytest.mark.parametrize("given", ["hidden_only", "cell_only"])
def test_lstm_one_state_given(kind, given):
    stock, ours = make_pair(kind, 4, 5)
    x = rand((2, 4, 4), 5)
    s = rand((2, 5), 6)
    hidden, cell = (s, None) if given == "hidden_only" else (None, s)
    # call with keywords, as users do
    for impl in ("legacy", "fast"):
        with __import__("mlx_fastrnn").use_impl(impl):
            out = ours(x, hidden=hidden, cell=cell)
        ref = stock(x, hidden=hidden, cell=cell)
        for a, b in zip(out, ref):
            assert_close(a, b, f"{impl} {given}")
    out_l, g_l = forward_and_grads(ours, x, hidden, cell, impl="legacy")
    out_f, g_f = forward_and_grads(ours, x, hidden, cell, impl="fast")
    assert_all_close(out_f, g_f, out_l, g_l, what=f"lstm {given}")


# --------------------------------------------------------------------------- dtypes

# float64 is CPU-only in MLX: these run on the CPU stream. amax propagates NaN.
def _max_err(a, ref):
    with mx.stream(mx.cpu):
        return amax(mx.abs(as_float64(a) - as_float64(ref)))


def _scale(ref):
    with mx.stream(mx.cpu):
        return max(1.0, amax(mx.abs(as_float64(ref))))


def _half_check(kind, fast_out, fast_g, leg_out, leg_g, ref_out, ref_g, eps, what):
    for i, (f, l, r) in enumerate(zip(fast_out, leg_out, ref_out)):
        assert f.dtype == l.dtype, f"{what} output[{i}] dtype {f.dtype} != stock {l.dtype}"
        assert f.shape == l.shape
        ef, el = _max_err(f, r), _max_err(l, r)
        assert ef <= el + eps * _scale(r), (
            f"{what} output[{i}]: fast err {ef:.3g} vs legacy err {el:.3g} (eps {eps})")
    assert set(fast_g) == set(leg_g)
    for k in sorted(leg_g):
        f, l, r = fast_g[k], leg_g[k], ref_g[k]
        assert f.dtype == l.dtype, f"{what} grad {k} dtype {f.dtype} != stock {l.dtype}"
        ef, el = _max_err(f, r), _max_err(l, r)
        assert ef <= el + 2 * eps * _scale(r), (
            f"{what} grad {k}: fast err {ef:.3g} vs legacy err {el:.3g} (eps {eps})")


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "state"])
@pytest.mark.parametrize("length", [6, 1])
def test_half_precision_vs_float32_reference(kind, dtype, with_state, length):
    stock, ours = make_pair(kind, 5, 8, dtype=dtype)
    x = rand((3, length, 5), 20, dtype=dtype)
    hidden = rand((3, 8), 21, dtype=dtype, scale=0.5) if with_state else None
    cell = rand((3, 8), 22, dtype=dtype) if with_state and is_lstm(kind) else None
    ref = float32_copy(stock, kind)
    up = lambda a: None if a is None else a.astype(mx.float32)  # noqa: E731
    ref_out, ref_g = forward_and_grads(ref, up(x), up(hidden), up(cell))
    leg_out, leg_g = forward_and_grads(ours, x, hidden, cell, impl="legacy")
    fast_out, fast_g = forward_and_grads(ours, x, hidden, cell, impl="fast")
    stock_out = forward(stock, x, hidden, cell)
    for s, l in zip(stock_out, leg_out):
        assert s.dtype == l.dtype == dtype
    _half_check(kind, fast_out, fast_g, leg_out, leg_g, ref_out, ref_g, HALF_EPS[dtype],
                f"{kind} {dtype}")


# (x dtype, weight dtype, hidden dtype | None)
MIXED = {
    "bf16_x_f32_w": (mx.bfloat16, None, None),
    "f16_x_f32_w_hidden": (mx.float16, None, mx.float32),
    "f32_hidden_bf16_w": (mx.bfloat16, mx.bfloat16, mx.float32),
    "f32_x_bf16_w": (mx.float32, mx.bfloat16, None),
    "f16_x_bf16_w": (mx.float16, mx.bfloat16, None),
    "bf16_hidden_f32_w": (mx.float32, None, mx.bfloat16),
}


@pytest.mark.parametrize("case", list(MIXED))
@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("length", [5, 1])
def test_mixed_dtypes_match_stock_dtype_and_reference(kind, case, length):
    x_dtype, w_dtype, h_dtype = MIXED[case]
    stock, ours = make_pair(kind, 4, 6, dtype=w_dtype)
    x = rand((2, length, 4), 30, dtype=x_dtype)
    hidden = rand((2, 6), 31, dtype=h_dtype, scale=0.5) if h_dtype is not None else None
    cell = rand((2, 6), 32, dtype=h_dtype) if (h_dtype is not None and is_lstm(kind)) else None
    ref = float32_copy(stock, kind)
    up = lambda a: None if a is None else a.astype(mx.float32)  # noqa: E731
    ref_out, ref_g = forward_and_grads(ref, up(x), up(hidden), up(cell))
    stock_out = forward(stock, x, hidden, cell)
    leg_out, leg_g = forward_and_grads(ours, x, hidden, cell, impl="legacy")
    fast_out, fast_g = forward_and_grads(ours, x, hidden, cell, impl="fast")
    for s, f in zip(stock_out, fast_out):
        assert f.dtype == s.dtype, f"{kind}/{case}: fast dtype {f.dtype} != stock {s.dtype}"
    # cotangent dtypes follow the primal dtypes
    for k in leg_g:
        assert fast_g[k].dtype == leg_g[k].dtype, f"grad {k}: {fast_g[k].dtype} != {leg_g[k].dtype}"
    # compare cotangents of ref against the (rounded) inputs
    eps = max(HALF_EPS.get(d, 0.0) for d in (x_dtype, w_dtype, h_dtype) if d is not None) or 1e-6
    _half_check(kind, fast_out, fast_g, leg_out, leg_g, ref_out, ref_g, eps, f"{kind}/{case}")


@pytest.mark.parametrize("w_dtype", [None, mx.bfloat16], ids=["f32_w", "bf16_w"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_integer_input(kind, w_dtype):
    stock, ours = make_pair(kind, 4, 6, dtype=w_dtype)
    x = mx.random.randint(-3, 4, (2, 5, 4), dtype=mx.int32, key=mx.random.key(0))
    stock_out = forward(stock, x)
    out_l, g_l = forward_and_grads(ours, x, impl="legacy")
    out_f, g_f = forward_and_grads(ours, x, impl="fast")
    for s, f in zip(stock_out, out_f):
        assert f.dtype == s.dtype
    if w_dtype is None:
        assert_all_close(out_f, g_f, out_l, g_l, what=f"{kind} int32 input")
    else:
        ref = float32_copy(stock, kind)
        ref_out, ref_g = forward_and_grads(ref, x)
        _half_check(kind, out_f, g_f, out_l, g_l, ref_out, ref_g, HALF_EPS[w_dtype], f"{kind} int+bf16")


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_float64_on_cpu_matches_stock(kind):
    with mx.stream(mx.cpu):
        stock, ours = make_pair(kind, 3, 4, dtype=mx.float64)
        x = rand((2, 3, 3), 40).astype(mx.float64)
        ref = forward(stock, x)
        out = forward(ours, x, impl="fast")
        for a, b in zip(out, ref):
            assert a.dtype == mx.float64
            assert_close(a, b, "float64")


# --------------------------------------------------------------------------- legacy is stock

@pytest.mark.parametrize("case", ["NLD_hidden", "LD", "lead2_hidden", "nobias", "H1"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_legacy_is_stock_bit_for_bit(kind, case):
    d, h, bias, x, hidden, cell = _inputs(kind, case)
    stock, ours = make_pair(kind, d, h, bias=bias)
    st, _ = outcome(lambda: forward(stock, x, hidden, cell))
    if st == "raise":
        pytest.skip("stock rejects this configuration (covered elsewhere)")
    out_s, g_s = forward_and_grads(stock, x, hidden, cell)
    out_l, g_l = forward_and_grads(ours, x, hidden, cell, impl="legacy")
    for a, b in zip(out_l, out_s):
        assert_equal_bits(a, b, "legacy output")
    assert set(g_l) == set(g_s)
    for k in g_s:
        assert_equal_bits(g_l[k], g_s[k], f"legacy grad {k}")
