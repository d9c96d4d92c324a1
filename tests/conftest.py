"""Shared helpers for the mlx_fastrnn test suite.

Every comparison builds a *stock* ``mlx.nn`` layer and one of ours with identical
weights (``ours.load_weights(list(tree_flatten(stock.parameters())))``), runs
both, and compares the outputs and the gradients of a fixed random linear loss
with respect to the input ``x``, every trainable parameter, ``hidden`` and
``cell``.

Tolerances (float32 results): ``rtol = RTOL = 1e-5`` and
``atol = ATOL * max(1, max|expected|)`` with ``ATOL = 1e-6`` (an absolute
tolerance scaled by the magnitude of the reference array, so that long
accumulations such as the recurrent-weight gradient are judged relative to
their size). Half-precision results are judged against a float32 reference
(see ``test_recurrent_fast_vs_legacy.py``).
"""

import os
import sys

# MLX's CUDA backend runs float32 matmuls in TF32 unless told otherwise (as its
# own test suite does): fp32 parity at our tolerances needs real fp32.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import pytest

import mlx.core as mx
import mlx.nn as nn
import mlx.nn.layers.recurrent as _recurrent
from mlx.utils import tree_flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mlx_fastrnn  # noqa: E402

# The stock classes, captured before any test can patch mlx.nn.
STOCK = {name: getattr(_recurrent, name) for name in ("GRU", "LSTM", "RNN")}
OURS = {name: getattr(mlx_fastrnn, name) for name in ("GRU", "LSTM", "RNN")}
for _name, _cls in STOCK.items():
    assert not _cls.__module__.startswith("mlx_fastrnn"), "mlx.nn was patched before the tests began"

RTOL = 1e-5
ATOL = 1e-6

# kind -> (class name, extra constructor kwargs)
KINDS = {
    "gru": ("GRU", {}),
    "lstm": ("LSTM", {}),
    "rnn_tanh": ("RNN", {}),
    "rnn_relu": ("RNN", {"nonlinearity": nn.relu}),
}
KIND_NAMES = list(KINDS)

HALF_EPS = {mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}


def _has_gpu():
    try:
        if mx.metal.is_available():
            return True
    except Exception:
        pass
    try:
        return bool(mx.cuda.is_available())
    except Exception:
        return False


HAS_GPU = _has_gpu()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a Metal or CUDA GPU (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="no GPU: neither mx.metal nor mx.cuda is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _never_leave_patched():
    """No test may leak a patched mlx.nn into the next one."""
    yield
    mlx_fastrnn.unpatch()


# --------------------------------------------------------------------------- layers

def layer_class(kind, ours):
    name = KINDS[kind][0]
    return (OURS if ours else STOCK)[name]


def is_lstm(kind):
    return KINDS[kind][0] == "LSTM"


def copy_weights(src, dst):
    dst.load_weights(list(tree_flatten(src.parameters())))
    mx.eval(dst.parameters())
    return dst


def make_pair(kind, input_size, hidden_size, bias=True, dtype=None, seed=0, **kwargs):
    """A stock layer and ours with identical weights (cast to ``dtype`` if given)."""
    name, extra = KINDS[kind]
    kw = dict(extra, **kwargs)
    if bias is not True:
        kw["bias"] = bias
    mx.random.seed(seed)
    stock = STOCK[name](input_size, hidden_size, **kw)
    if dtype is not None:
        stock.set_dtype(dtype)
    mx.eval(stock.parameters())
    ours = copy_weights(stock, OURS[name](input_size, hidden_size, **kw))
    return stock, ours


def float32_copy(layer, kind):
    """A stock float32 layer holding ``layer``'s (possibly half) weights exactly."""
    name, extra = KINDS[kind]
    cls = STOCK[name]
    kw = dict(extra)
    if isinstance(layer, nn.RNN):
        kw["nonlinearity"] = layer.nonlinearity
        input_size, hidden = layer.Wxh.shape[1], layer.hidden_size
        bias = layer.bias is not None
    else:
        input_size, hidden = layer.Wx.shape[1], layer.hidden_size
        bias = (layer.b if isinstance(layer, nn.GRU) else layer.bias) is not None
    ref = cls(input_size, hidden, bias=bias, **kw)
    ref.load_weights([(k, v.astype(mx.float32)) for k, v in tree_flatten(layer.parameters())])
    mx.eval(ref.parameters())
    return ref


def rand(shape, seed, dtype=mx.float32, scale=1.0):
    a = mx.random.normal(shape, key=mx.random.key(seed)) * scale
    return a.astype(dtype)


# --------------------------------------------------------------------------- calling

def call(layer, x, hidden=None, cell=None):
    """Call like user code would (positional, only what is given); always a tuple."""
    if cell is not None:
        out = layer(x, hidden, cell)
    elif hidden is not None:
        out = layer(x, hidden)
    else:
        out = layer(x)
    return out if isinstance(out, tuple) else (out,)


def _impl_ctx(impl):
    import contextlib

    return mlx_fastrnn.use_impl(impl) if impl is not None else contextlib.nullcontext()


def forward(layer, x, hidden=None, cell=None, impl=None):
    with _impl_ctx(impl):
        out = call(layer, x, hidden, cell)
    mx.eval(out)
    return out


def forward_and_grads(layer, x, hidden=None, cell=None, impl=None, seed=1234, grad_x=None):
    """Outputs and the gradients of ``sum_i <out_i, cot_i>`` (random cotangents).

    Returns ``(outputs, grads)`` where ``grads`` maps ``"x"``, ``"hidden"``,
    ``"cell"`` (those given, and floating) and ``"p.<param path>"`` (every
    trainable parameter) to arrays.
    """
    with _impl_ctx(impl):
        outs = call(layer, x, hidden, cell)
        mx.eval(outs)
        cots = [rand(o.shape, seed + i) for i, o in enumerate(outs)]

        if grad_x is None:
            grad_x = mx.issubdtype(x.dtype, mx.floating)
        fixed = {"x": x, "hidden": hidden, "cell": cell}
        inputs = {k: v for k, v in fixed.items() if v is not None and (k != "x" or grad_x)
                  and mx.issubdtype(v.dtype, mx.floating)}
        params = layer.trainable_parameters()

        def loss_fn(params, inputs):
            layer.update(params)
            args = dict(fixed, **inputs)
            out = call(layer, args["x"], args["hidden"], args["cell"])
            total = mx.array(0.0)
            for o, c in zip(out, cots):
                total = total + (o.astype(mx.float32) * c).sum()
            return total

        try:
            _, (gp, gi) = mx.value_and_grad(loss_fn, argnums=(0, 1))(params, inputs)
        finally:
            layer.update(params)
    grads = {f"p.{k}": v for k, v in tree_flatten(gp)}
    grads.update(gi)
    mx.eval(grads)
    return outs, grads


# --------------------------------------------------------------------------- comparing

def as_float64(a):
    """``a`` (an mlx array, or a Python number/list) as a float64 mlx array.

    float64 is CPU-only in MLX, so this and every helper below computes on the
    CPU stream; float16/bfloat16/float32/int/bool convert exactly.
    """
    if not isinstance(a, mx.array):
        return mx.array(a, dtype=mx.float64)
    return a.astype(mx.float64, stream=mx.cpu)


def amax(a):
    """``float(a.max())`` with NaN propagation (like numpy's ``.max()``)."""
    with mx.stream(mx.cpu):
        if mx.any(mx.isnan(a)).item():
            return float("nan")
        return float(a.max().item())


def unravel_index(flat, shape):
    idx = []
    for d in reversed(shape):
        flat, r = divmod(flat, d)
        idx.append(r)
    return tuple(reversed(idx))


def _first_true(mask):
    """Index tuple of the first True element of a non-empty boolean mask that has one."""
    return unravel_index(int(mx.argmax(mask.flatten().astype(mx.uint8)).item()), mask.shape)


def assert_allclose(actual, expected, rtol, atol, name="", where=None):
    """``numpy.testing.assert_allclose(actual, expected, rtol, atol, equal_nan=True)`` in mlx.

    Computed in float64: NaN, +Inf and -Inf must sit at the same positions in
    both; every other element must satisfy
    ``|actual - expected| <= atol + rtol * |expected|``. ``where`` (a boolean
    array of the same shape) restricts every check to those elements. On
    failure the message gives the mismatch count, the max abs and rel
    differences and the worst index with its values.
    """
    with mx.stream(mx.cpu):
        a, e = as_float64(actual), as_float64(expected)
        assert tuple(a.shape) == tuple(e.shape), (
            f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
        if a.size == 0:
            return
        sel = mx.ones(a.shape, dtype=mx.bool_) if where is None else mx.broadcast_to(where, a.shape)
        for label, pred in (("NaN", mx.isnan), ("+Inf", mx.isposinf), ("-Inf", mx.isneginf)):
            differ = (pred(a) != pred(e)) & sel
            if mx.any(differ).item():
                i = _first_true(differ)
                raise AssertionError(
                    f"{name}: {label} positions differ at {int(differ.sum().item())} of "
                    f"{int(sel.sum().item())} elements; first at index {i}: "
                    f"actual {a[i].item()!r}, expected {e[i].item()!r}")
        # NaN/Inf positions agree, so these are the elements finite in both
        comp = sel & mx.isfinite(e)
        diff = mx.where(comp, mx.abs(a - e), 0.0)
        tol = atol + rtol * mx.abs(e)
        bad = comp & ~(diff <= tol)
        if not mx.any(bad).item():
            return
        nz = comp & (e != 0)
        rel = mx.where(nz, diff / mx.where(nz, mx.abs(e), 1.0), 0.0)
        excess = mx.where(bad, diff - tol, -mx.inf)
        i = unravel_index(int(mx.argmax(excess.flatten()).item()), a.shape)
        raise AssertionError(
            f"{name}: not close (rtol={rtol:g}, atol={atol:g}): "
            f"{int(bad.sum().item())} of {int(comp.sum().item())} elements mismatched; "
            f"max abs diff {amax(diff):.6g}, max rel diff {amax(rel):.6g}; "
            f"worst at index {i}: actual {a[i].item()!r}, expected {e[i].item()!r}, "
            f"|diff| {diff[i].item():.6g} > tol {tol[i].item():.6g}")


def assert_close(actual, expected, name="", rtol=RTOL, atol=ATOL, check_dtype=True):
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if check_dtype:
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    with mx.stream(mx.cpu):
        e = as_float64(expected)
        finite = mx.isfinite(e)
        scale = max(1.0, amax(mx.where(finite, mx.abs(e), 0.0))) if mx.any(finite).item() else 1.0
    assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, name=name)


def assert_equal_bits(actual, expected, name=""):
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape differs"
    if mx.array_equal(actual, expected, equal_nan=True).item():
        return
    with mx.stream(mx.cpu):
        a, e = as_float64(actual), as_float64(expected)
        diff = mx.abs(a - e)
        differ = ~((a == e) | (mx.isnan(a) & mx.isnan(e)))
        i = _first_true(differ)
        nanmax = amax(mx.where(mx.isnan(diff), -mx.inf, diff))
    raise AssertionError(
        f"{name}: not bitwise equal (max abs diff {nanmax}; {int(differ.sum().item())} elements "
        f"differ, first at index {i}: actual {a[i].item()!r}, expected {e[i].item()!r})")


def assert_all_close(out_a, grads_a, out_b, grads_b, what="", **tol):
    assert len(out_a) == len(out_b), f"{what}: {len(out_a)} outputs vs {len(out_b)}"
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        assert_close(a, b, f"{what} output[{i}]", **tol)
    assert set(grads_a) == set(grads_b), f"{what}: gradient keys {sorted(grads_a)} vs {sorted(grads_b)}"
    for k in sorted(grads_b):
        assert_close(grads_a[k], grads_b[k], f"{what} grad {k}", **tol)


def outcome(fn):
    """('ok', result) or ('raise', exception)."""
    try:
        r = fn()
        mx.eval(r)
        return "ok", r
    except Exception as e:  # noqa: BLE001 - we compare exception types
        return "raise", e


# --------------------------------------------------------------------- step results

def flat_step_results(result):
    """A step's results -> a list of arrays (None kept): a backward step's
    ``(dx, dhp, direct)`` is unpacked, anything else listed as it is."""
    if len(result) == 3 and isinstance(result[2], tuple):
        return [result[0], result[1], *result[2]]
    return list(result)


def assert_step_results(actual, expected, what, **tol):
    """Every array of two steps' results close (``assert_close``), ``None`` where expected."""
    actual, expected = flat_step_results(actual), flat_step_results(expected)
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"{what}[{i}]: expected None"
            continue
        mx.eval(a, e)
        assert_close(a, e, f"{what}[{i}]", **tol)
