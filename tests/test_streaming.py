"""Streaming steps (length 1) on the GPU path: ``ops/streaming.py``'s fused step.

On a GPU a plain length-1 GRU / LSTM call runs two matmuls and the cell's
fused forward kernel, differentiated by its fused backward kernel. Here the
very kernel sources run through the host harness (``host:cuda`` / ``host:metal``
stand in for the GPU target), under the layers' own entry, against stock
``mlx.nn``: outputs and every gradient, batch shapes, missing states, no bias,
half precision and mixed dtypes, vmap, jvp and second order. The ``gpu``-marked
tests repeat the parity on the real device.
"""

import pytest

import mlx.core as mx

import mlx_fastrnn
from mlx_fastrnn.kernels import host_harness
from mlx_fastrnn.ops import streaming
from conftest import (
    HALF_EPS,
    STOCK,
    assert_all_close,
    assert_close,
    call,
    float32_copy,
    forward,
    forward_and_grads,
    make_pair,
    rand,
)

HOST_TARGETS = ["host:cuda", "host:metal"]

# id: (x shape, hidden shape | None, cell shape | None, bias); "H" = hidden size
CASES = {
    "no_state": ((3, 1, 4), None, None, True),
    "states": ((3, 1, 4), (3, "H"), (3, "H"), True),
    "unbatched": ((1, 4), ("H",), ("H",), True),
    "no_bias": ((3, 1, 4), (3, "H"), (3, "H"), False),
    "lead2": ((2, 3, 1, 4), (2, 3, "H"), (2, 3, "H"), True),
    "hidden_only": ((3, 1, 4), (3, "H"), None, True),
    "cell_only": ((3, 1, 4), None, (3, "H"), True),
}
HIDDEN = 33  # not a multiple of 32


def _shape(shape, hidden):
    return None if shape is None else tuple(hidden if d == "H" else d for d in shape)


def _inputs(kind, case, dtype=mx.float32, hidden=HIDDEN):
    x_shape, h_shape, c_shape, _ = CASES[case]
    x = rand(x_shape, 1, dtype)
    h = rand(_shape(h_shape, hidden), 2, dtype) if h_shape else None
    c = rand(_shape(c_shape, hidden), 3, dtype) if (c_shape and kind == "lstm") else None
    return x, h, c


def _route_to(monkeypatch, target):
    """The layers' streaming steps take the GPU path with ``target``, uncompiled
    (the host harness runs eagerly, which a compile trace can't hold)."""
    monkeypatch.setattr(streaming, "gpu_target", lambda: target)
    monkeypatch.setattr(streaming, "_gru_gpu", streaming._gru_fused)
    monkeypatch.setattr(streaming, "_lstm_gpu", streaming._lstm_fused)


@pytest.fixture
def fused_on(monkeypatch, request):
    """Route the layers' streaming steps to the fused path on ``target``, and
    make sure nothing else runs: no stock call, no compiled CPU step."""
    target = request.param

    def refuse(*args, **kwargs):
        raise AssertionError("a streaming step left the fused path")

    _route_to(monkeypatch, target)
    monkeypatch.setattr(streaming, "_gru_compiled", refuse)
    monkeypatch.setattr(streaming, "_lstm_compiled", refuse)
    for name in ("GRU", "LSTM"):
        monkeypatch.setattr(STOCK[name], "__call__", refuse)
    return target


@pytest.mark.parametrize("fused_on", HOST_TARGETS, indirect=True)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_fused_step_matches_stock(kind, case, fused_on, monkeypatch):
    if kind == "gru" and case == "cell_only":
        pytest.skip("GRU has no cell state")
    stock, ours = make_pair(kind, 4, HIDDEN, bias=CASES[case][3])
    x, h, c = _inputs(kind, case)
    out_f, g_f = forward_and_grads(ours, x, h, c, impl="fast")
    monkeypatch.undo()  # stock runs again for the reference
    out_s, g_s = forward_and_grads(stock, x, h, c)
    assert_all_close(out_f, g_f, out_s, g_s, what=f"{kind} {case} {fused_on}")


@pytest.mark.parametrize("fused_on", HOST_TARGETS, indirect=True)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_fused_step_half_precision(kind, dtype, fused_on, monkeypatch):
    """Half weights and inputs: the result has stock's dtype, and is at least as
    close to a float32 stock run on the same rounded values as stock is (up to
    eps), outputs and gradients."""
    stock, ours = make_pair(kind, 4, HIDDEN, dtype=dtype)
    x, h, c = _inputs(kind, "states", dtype)
    out_f, g_f = forward_and_grads(ours, x, h, c, impl="fast")
    monkeypatch.undo()
    out_s, g_s = forward_and_grads(stock, x, h, c)
    f32 = lambda a: None if a is None else a.astype(mx.float32)  # noqa: E731
    out_r, g_r = forward_and_grads(float32_copy(stock, kind), f32(x), f32(h), f32(c))
    eps = HALF_EPS[dtype]
    pairs = [(f"out{i}", a, b, r) for i, (a, b, r) in enumerate(zip(out_f, out_s, out_r))]
    pairs += [(k, g_f[k], g_s[k], g_r[k]) for k in g_s]
    for name, fast, stock_v, ref in pairs:
        assert fast.dtype == stock_v.dtype, f"{name}: dtype {fast.dtype} != stock's {stock_v.dtype}"
        with mx.stream(mx.cpu):
            err_f = float(mx.abs(fast.astype(mx.float32) - ref).max())
            err_s = float(mx.abs(stock_v.astype(mx.float32) - ref).max())
            scale = max(1.0, float(mx.abs(ref).max()))
        assert err_f <= err_s + eps * scale, f"{name}: fast err {err_f:g} vs stock err {err_s:g}"


@pytest.mark.parametrize("fused_on", ["host:cuda"], indirect=True)
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_fused_step_mixed_dtypes(kind, fused_on, monkeypatch):
    """float16 input into a float32 layer: float32 results, as stock's."""
    stock, ours = make_pair(kind, 4, HIDDEN)
    x, h, c = _inputs(kind, "states", mx.float16)
    out_f, g_f = forward_and_grads(ours, x, h, c, impl="fast")
    monkeypatch.undo()
    out_s, g_s = forward_and_grads(stock, x, h, c)
    assert_all_close(out_f, g_f, out_s, g_s, what=f"{kind} mixed")


def _jvp(layer):
    x, h = rand((2, 1, 3), 11), rand((2, 5), 12)
    tx, th = rand((2, 1, 3), 13), rand((2, 5), 14)
    _, tangents = mx.jvp(lambda x, h: call(layer, x, h), [x, h], [tx, th])
    mx.eval(tangents)
    return tangents


@pytest.mark.parametrize("fused_on", ["host:cuda"], indirect=True)
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_fused_step_jvp(kind, fused_on, monkeypatch):
    """jvp through the fused op is its reference step's. (vmap and second
    order: the GPU test below; the host harness runs eagerly, so neither
    reaches a kernel node here.)"""
    stock, ours = make_pair(kind, 3, 5)
    with mlx_fastrnn.use_impl("fast"):
        got = _jvp(ours)
    monkeypatch.undo()
    for a, b in zip(got, _jvp(stock)):
        assert_close(a, b, "jvp tangent", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_fused_step_runs_the_kernels(kind, monkeypatch):
    """The fused path launches the cell's forward kernel, and under a gradient
    its backward kernel: one launch each per step."""
    launched = []
    real_run = host_harness.run

    def spy(ks, *args, **kwargs):
        launched.append(ks.name)
        return real_run(ks, *args, **kwargs)

    monkeypatch.setattr(host_harness, "run", spy)
    _route_to(monkeypatch, "host:cuda")
    _, ours = make_pair(kind, 4, HIDDEN)
    x, h, c = _inputs(kind, "states")
    forward(ours, x, h, c, impl="fast")
    assert launched == [f"{kind}_forward"]
    launched.clear()
    forward_and_grads(ours, x, h, c, impl="fast")
    assert sorted(launched) == sorted([f"{kind}_forward"] * 2 + [f"{kind}_backward"])


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["no_state", "states", "lead2", "no_bias"])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_gpu_fused_step_matches_cpu_stock(kind, case):
    assert streaming.gpu_target() is not None
    with mx.stream(mx.cpu):
        stock, ours = make_pair(kind, 4, 65, bias=CASES[case][3])
        x, h, c = _inputs(kind, case, hidden=65)
        out_s, g_s = forward_and_grads(stock, x, h, c)
    out_f, g_f = forward_and_grads(ours, x, h, c, impl="fast")
    assert_all_close(out_f, g_f, out_s, g_s, what=f"gpu {kind} {case}", rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_gpu_fused_step_bfloat16_dtype_and_error(kind):
    stock, ours = make_pair(kind, 4, 65, dtype=mx.bfloat16)
    x, h, c = _inputs(kind, "states", mx.bfloat16, hidden=65)
    out_f, g_f = forward_and_grads(ours, x, h, c, impl="fast")
    f32 = lambda a: None if a is None else a.astype(mx.float32)  # noqa: E731
    with mx.stream(mx.cpu):
        out_r, g_r = forward_and_grads(float32_copy(stock, kind), f32(x), f32(h), f32(c))
    for name, a, r in [(f"out{i}", a, r) for i, (a, r) in enumerate(zip(out_f, out_r))] + \
            [(k, g_f[k], g_r[k]) for k in g_r]:
        assert a.dtype == mx.bfloat16, name
        assert_close(a.astype(mx.float32), r, name, rtol=0, atol=4 * HALF_EPS[mx.bfloat16],
                     check_dtype=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_gpu_fused_step_jvp_right_vmap_and_second_order_refused(kind):
    """On the device: jvp right; vmap and a gradient of the gradient refused
    loudly (custom kernels have neither in MLX: README, known limitations)."""
    stock, ours = make_pair(kind, 3, 5)
    with mlx_fastrnn.use_impl("fast"):
        got = _jvp(ours)
    with mx.stream(mx.cpu):
        ref = _jvp(stock)
    for a, b in zip(got, ref):
        assert_close(a, b, "jvp tangent", rtol=1e-4, atol=1e-5)
    x, h = rand((4, 2, 1, 3), 11), rand((2, 5), 12)

    def penalty(x):
        return (mx.grad(lambda x: sum((o * o).sum() for o in call(ours, x, h)))(x) ** 2).sum()

    with mlx_fastrnn.use_impl("fast"):
        with pytest.raises(ValueError, match="CustomKernel"):
            mx.eval(mx.vmap(lambda v: call(ours, v))(x))
        with pytest.raises(ValueError, match="CustomKernel"):
            mx.eval(mx.grad(penalty)(x[0]))
