"""Drop-in fidelity: our GRU/LSTM/RNN are stock mlx.nn layers in every observable way.

Class hierarchy, constructor and call signatures, random initialisation,
parameter names/shapes/dtypes, weight files both ways, freeze/unfreeze,
optimizer steps, no extra arrays stored on the module, repr, custom RNN
nonlinearities, and use under mx.compile / nn.value_and_grad / mx.vmap /
mx.stream. Numerical tolerances are those of conftest (rtol 1e-5, atol 1e-6
scaled by max(1, max|expected|)), except the optimizer tests (see there).
"""

import contextlib
import functools
import inspect

import pytest

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

import mlx_fastrnn
from mlx_fastrnn.kernels.launch import gpu_target
from conftest import (
    KIND_NAMES,
    KINDS,
    OURS,
    STOCK,
    assert_all_close,
    assert_allclose,
    assert_close,
    assert_equal_bits,
    call,
    forward,
    forward_and_grads,
    is_lstm,
    make_pair,
    rand,
)

NAMES = ["GRU", "LSTM", "RNN"]


def _flat(module):
    return {k: v for k, v in tree_flatten(module.parameters())}


# --------------------------------------------------------------------------- class / API

@pytest.mark.parametrize("name", NAMES)
def test_is_subclass_and_instance_of_stock(name):
    layer = OURS[name](3, 4)
    assert issubclass(OURS[name], STOCK[name])
    assert isinstance(layer, STOCK[name])
    assert isinstance(layer, nn.Module)
    assert type(layer).__name__ == name
    # the stock docstring is kept
    assert OURS[name].__doc__ == STOCK[name].__doc__


@pytest.mark.parametrize("name", NAMES)
def test_signatures_identical(name):
    assert inspect.signature(OURS[name].__init__) == inspect.signature(STOCK[name].__init__)
    assert inspect.signature(OURS[name].__call__) == inspect.signature(STOCK[name].__call__)
    assert inspect.signature(OURS[name]) == inspect.signature(STOCK[name])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_same_random_init_and_parameter_layout(name, bias):
    mx.random.seed(7)
    stock = STOCK[name](5, 7, bias=bias)
    mx.random.seed(7)
    ours = OURS[name](5, 7, bias=bias)
    fs, fo = _flat(stock), _flat(ours)
    assert list(fs) == list(fo)
    for k in fs:
        assert fo[k].shape == fs[k].shape and fo[k].dtype == fs[k].dtype
        assert_equal_bits(fo[k], fs[k], k)
    assert sorted(ours.keys()) == sorted(stock.keys())
    assert ours.hidden_size == stock.hidden_size == 7
    expected = {"GRU": ["Wx", "Wh", "b", "bhn"], "LSTM": ["Wx", "Wh", "bias"], "RNN": ["Wxh", "Whh", "bias"]}[name]
    if not bias:
        expected = expected[:2]
    assert sorted(fo) == sorted(expected)
    # positional constructor arguments, as stock takes them
    assert sorted(_flat(OURS[name](5, 7, bias))) == sorted(expected)


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
@pytest.mark.parametrize("direction", ["stock_to_ours", "ours_to_stock"])
@pytest.mark.parametrize("name", NAMES)
def test_weight_files_round_trip(name, direction, fmt, tmp_path):
    mx.random.seed(1)
    src = (STOCK if direction == "stock_to_ours" else OURS)[name](4, 6)
    mx.random.seed(2)
    dst = (OURS if direction == "stock_to_ours" else STOCK)[name](4, 6)
    path = str(tmp_path / f"w.{fmt}")
    src.save_weights(path)
    dst.load_weights(path)
    fs, fd = _flat(src), _flat(dst)
    assert list(fs) == list(fd)
    for k in fs:
        assert_equal_bits(fd[k], fs[k], k)
    x = rand((2, 3, 4), 3)
    stock_layer = src if direction == "stock_to_ours" else dst
    ours_layer = dst if direction == "stock_to_ours" else src
    ref = forward(stock_layer, x)
    for a, b in zip(forward(ours_layer, x, impl="legacy"), ref):
        assert_equal_bits(a, b, "legacy after load")
    for a, b in zip(forward(ours_layer, x, impl="fast"), ref):
        assert_close(a, b, "fast after load")
    # strict loading rejects the same bad files in both
    bad = [(k, v) for k, v in tree_flatten(src.parameters())][:-1]
    for layer in (OURS[name](4, 6), STOCK[name](4, 6)):
        with pytest.raises(ValueError):
            layer.load_weights(bad)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_freeze_unfreeze_and_grads_of_trainable(kind):
    stock, ours = make_pair(kind, 3, 5)
    frozen_key = "Wh" if KINDS[kind][0] != "RNN" else "Whh"
    for layer in (stock, ours):
        layer.freeze()
    assert tree_flatten(ours.trainable_parameters()) == [] == tree_flatten(stock.trainable_parameters())
    for layer in (stock, ours):
        layer.unfreeze()
        layer.freeze(keys=[frozen_key])
    ts, to = dict(tree_flatten(stock.trainable_parameters())), dict(tree_flatten(ours.trainable_parameters()))
    assert sorted(ts) == sorted(to) and frozen_key not in to
    x = rand((2, 4, 3), 4)

    def loss(model, x):
        return sum((o * o).sum() for o in call(model, x))

    _, gs = nn.value_and_grad(stock, loss)(stock, x)
    for impl in ("legacy", "fast"):
        with mlx_fastrnn.use_impl(impl):
            _, go = nn.value_and_grad(ours, loss)(ours, x)
        gs_f, go_f = dict(tree_flatten(gs)), dict(tree_flatten(go))
        assert sorted(gs_f) == sorted(go_f)
        for k in gs_f:
            assert_close(go_f[k], gs_f[k], f"{impl} grad {k}")
    ours.unfreeze()
    assert sorted(dict(tree_flatten(ours.trainable_parameters()))) == sorted(_flat(ours))


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_adam_steps_match_stock(kind):
    """Three Adam steps from identical weights give the same weights.

    Adam normalises the gradient, so the comparison is rtol 1e-4, atol 1e-6.
    """
    stock, ours = make_pair(kind, 4, 6)
    x = rand((3, 5, 4), 8)
    target = rand((3, 5, 6), 9)

    def loss(model, x, y):
        return sum(((o - y) ** 2).mean() for o in call(model, x))

    results = {}
    for label, model in (("stock", stock), ("ours", ours)):
        opt = optim.Adam(learning_rate=1e-2)
        step = nn.value_and_grad(model, loss)
        for _ in range(3):
            with mlx_fastrnn.use_impl("fast"):
                lval, grads = step(model, x, target)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
        results[label] = _flat(model)
    assert list(results["ours"]) == list(results["stock"])
    for k, v in results["stock"].items():
        assert_close(results["ours"][k], v, f"after Adam {k}", rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_compiled_train_step_with_state(kind):
    """The usual MLX training loop: mx.compile over model.state and optimizer.state."""
    stock, ours = make_pair(kind, 4, 6)
    x = rand((2, 5, 4), 10)
    y = rand((2, 5, 6), 11)

    def loss(model, x, y):
        return sum(((o - y) ** 2).mean() for o in call(model, x))

    results = {}
    for label, model in (("stock", stock), ("ours", ours)):
        opt = optim.SGD(learning_rate=0.1)
        state = [model.state, opt.state]

        @functools.partial(mx.compile, inputs=state, outputs=state)
        def step(x, y):
            lval, grads = nn.value_and_grad(model, loss)(model, x, y)
            opt.update(model, grads)
            return lval

        losses = []
        for _ in range(3):
            losses.append(step(x, y).item())
            mx.eval(state)
        results[label] = (_flat(model), losses)
    assert_allclose(results["ours"][1], results["stock"][1], rtol=1e-5, atol=0.0, name="compiled SGD losses")
    for k, v in results["stock"][0].items():
        assert_close(results["ours"][0][k], v, f"compiled SGD {k}", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_no_arrays_cached_on_the_module(kind):
    stock, ours = make_pair(kind, 3, 5)
    x = rand((2, 4, 3), 12)
    h = rand((2, 5), 13)
    keys_before = sorted(ours.keys())
    attrs_before = set(vars(ours))
    for impl in ("fast", "legacy"):
        forward(ours, x, impl=impl)
        forward_and_grads(ours, x, h, h if is_lstm(kind) else None, impl=impl)
        with mlx_fastrnn.use_impl(impl):
            mx.eval(mx.compile(lambda x: call(ours, x))(x))
    assert sorted(ours.keys()) == keys_before == sorted(stock.keys())
    assert list(_flat(ours)) == list(_flat(stock))
    assert set(vars(ours)) == attrs_before == set(vars(stock))

    def arrays_in(obj, depth=0):
        if isinstance(obj, mx.array):
            return 1
        if depth > 3:
            return 0
        if isinstance(obj, (list, tuple, set)):
            return sum(arrays_in(o, depth + 1) for o in obj)
        if isinstance(obj, dict):
            return sum(arrays_in(o, depth + 1) for o in obj.values())
        return 0

    assert arrays_in(dict(vars(ours))) == 0, "arrays stored as plain attributes on the module"
    assert len(tree_flatten(ours.parameters())) == len(tree_flatten(stock.parameters()))
    # the module itself still holds exactly stock's parameter arrays
    assert sorted(k for k, _ in tree_flatten(dict(ours))) == sorted(k for k, _ in tree_flatten(dict(stock)))


_REPR_CASES = [(n, None) for n in NAMES] + [("RNN", nl) for nl in ("relu", "gelu", "ReLU()", "lambda")]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name,nonlinearity", _REPR_CASES, ids=[f"{n}-{nl}" for n, nl in _REPR_CASES])
def test_repr_matches_stock(name, bias, nonlinearity):
    kw = {}
    if nonlinearity is not None:
        fn = {"relu": nn.relu, "gelu": nn.gelu, "ReLU()": nn.ReLU(), "lambda": lambda v: mx.sin(v)}[nonlinearity]
        kw["nonlinearity"] = fn
    stock, ours = STOCK[name](3, 4, bias=bias, **kw), OURS[name](3, 4, bias=bias, **kw)
    assert repr(ours) == repr(stock)
    assert str(ours) == str(stock)
    assert ours._extra_repr() == stock._extra_repr()


def test_rnn_non_callable_nonlinearity_same_error():
    with pytest.raises(ValueError) as stock_exc:
        STOCK["RNN"](3, 4, nonlinearity=5)
    with pytest.raises(type(stock_exc.value)):
        OURS["RNN"](3, 4, nonlinearity=5)


# --------------------------------------------------------------------------- nonlinearities

class _LeakyReLU(nn.ReLU):
    """A subclass of nn.ReLU that is NOT relu: the fast path must not fuse it as relu.

    It holds an array so that the module is truthy (stock does
    ``nonlinearity or tanh``, and an empty Module is an empty dict, i.e. falsy).
    """

    def __init__(self):
        super().__init__()
        self.slope = mx.array(0.2)

    def __call__(self, x):
        return mx.where(x > 0, x, self.slope * x)


class _ScaledTanh(nn.Tanh):
    def __init__(self):
        super().__init__()
        self.scale = mx.array(1.5)

    def __call__(self, x):
        return self.scale * mx.tanh(x)


NONLINEARITIES = {
    "nn.relu": nn.relu,
    "mx.tanh": mx.tanh,
    "nn.tanh": nn.tanh,
    "nn.ReLU()": nn.ReLU(),
    "nn.Tanh()": nn.Tanh(),
    "lambda_sin": lambda v: mx.sin(v),
    "mx.sigmoid": mx.sigmoid,
    "nn.gelu": nn.gelu,
    "partial_leaky": functools.partial(nn.leaky_relu, negative_slope=0.1),
    "ReLU_subclass_leaky": _LeakyReLU(),
    "Tanh_subclass_scaled": _ScaledTanh(),
    "nn.PReLU()": nn.PReLU(),
}


@pytest.mark.parametrize("with_hidden", [False, True], ids=["nohidden", "hidden"])
@pytest.mark.parametrize("nl", list(NONLINEARITIES))
def test_rnn_custom_nonlinearity_equals_stock(nl, with_hidden):
    fn = NONLINEARITIES[nl]
    mx.random.seed(3)
    stock = STOCK["RNN"](4, 6, nonlinearity=fn)
    ours = OURS["RNN"](4, 6, nonlinearity=fn)
    ours.load_weights(list(tree_flatten(stock.parameters())))
    x = rand((3, 5, 4), 14)
    h = rand((3, 6), 15) if with_hidden else None
    out_s, g_s = forward_and_grads(stock, x, h)
    for impl in ("fast", "legacy"):
        out_o, g_o = forward_and_grads(ours, x, h, impl=impl)
        assert_all_close(out_o, g_o, out_s, g_s, what=f"RNN({nl}) {impl}")


@pytest.mark.parametrize("bias", [True, False])
def test_rnn_relu_gradient_at_exact_zero(bias):
    """Pre-activations exactly 0 (zero input, zero state): relu's gradient convention."""
    stock, ours = make_pair("rnn_relu", 3, 4, bias=bias)
    if bias:
        for layer in (stock, ours):
            layer.bias = mx.zeros_like(layer.bias)
    x = mx.zeros((2, 3, 3))
    h = mx.zeros((2, 4))
    out_s, g_s = forward_and_grads(stock, x, h)
    out_f, g_f = forward_and_grads(ours, x, h, impl="fast")
    assert_all_close(out_f, g_f, out_s, g_s, what="relu at 0")


# --------------------------------------------------------------------------- transforms / streams

@pytest.mark.parametrize("kind", KIND_NAMES)
def test_under_mx_compile(kind):
    stock, ours = make_pair(kind, 4, 6)
    lstm = is_lstm(kind)

    def fn(layer):
        def f(x, h):
            return call(layer, x, h, h * 0.5 if lstm else None)
        return f

    for impl in ("fast", "legacy"):
        f_ours = mx.compile(fn(ours))  # one per impl: the trace depends on it
        for shape in [(2, 5, 4), (3, 2, 4), (5, 4), (3, 1, 4)]:  # recompiles on new shapes
            x = rand(shape, 16)
            h = rand((*shape[:-2], 6), 17)
            ref = fn(stock)(x, h)
            with mlx_fastrnn.use_impl(impl):
                got = f_ours(x, h)
            for a, b in zip(got, ref):
                assert_close(a, b, f"compiled {impl} {shape}")

    # a compiled gradient
    def loss(layer):
        def f(x, h):
            return sum((o * o).sum() for o in fn(layer)(x, h))
        return f

    for length in (5, 1):
        x, h = rand((2, length, 4), 18), rand((2, 6), 19)
        g_ref = mx.grad(loss(stock), argnums=(0, 1))(x, h)
        with mlx_fastrnn.use_impl("fast"):
            g = mx.compile(mx.grad(loss(ours), argnums=(0, 1)))(x, h)
        for a, b in zip(g, g_ref):
            assert_close(a, b, f"compiled grad, length {length}")


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_nn_value_and_grad_in_a_model(kind):
    class Model(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn
            self.head = nn.Linear(6, 2)

        def __call__(self, x):
            return self.head(call(self.rnn, x)[0][..., -1, :])

    stock, ours = make_pair(kind, 4, 6)
    mx.random.seed(5)
    ms = Model(stock)
    mo = Model(ours)
    mo.head.load_weights(list(tree_flatten(ms.head.parameters())))
    x, y = rand((3, 5, 4), 20), rand((3, 2), 21)

    def loss(model, x, y):
        return ((model(x) - y) ** 2).mean()

    ls, gs = nn.value_and_grad(ms, loss)(ms, x, y)
    with mlx_fastrnn.use_impl("fast"):
        lo, go = nn.value_and_grad(mo, loss)(mo, x, y)
    assert_close(lo, ls, "loss")
    gs, go = dict(tree_flatten(gs)), dict(tree_flatten(go))
    assert sorted(gs) == sorted(go)
    for k in gs:
        assert_close(go[k], gs[k], f"grad {k}")


@pytest.mark.parametrize("length", [5, 1])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_under_vmap(kind, length):
    stock, ours = make_pair(kind, 3, 4)
    x = rand((4, 2, length, 3), 22)
    ref = mx.vmap(lambda v: call(stock, v))(x)
    with _gpu_kernels_may_refuse():
        with mlx_fastrnn.use_impl("fast"):
            got = mx.vmap(lambda v: call(ours, v))(x)
            mx.eval(got)
        for a, b in zip(got, ref):
            assert_close(a, b, "vmap")


WEIGHTS = {"gru": ("Wh", "bhn", "Wx"), "lstm": ("Wh", "Wx"), "rnn_tanh": ("Whh", "Wxh"), "rnn_relu": ("Whh",)}


@pytest.mark.parametrize("length", [5, 1])
@pytest.mark.parametrize("kind,name", [(k, n) for k, names in WEIGHTS.items() for n in names])
def test_under_vmap_over_a_parameter(kind, name, length):
    """vmap over the weights (an ensemble): each mapped W_h a problem of its own; outputs and
    the gradient w.r.t. the mapped weights as stock's. (Biases: MLX's addmm refuses a mapped
    bias, stock's and ours alike.)"""
    stock, ours = make_pair(kind, 3, 4)
    x = rand((2, length, 3), 22)
    ws = rand((3, *getattr(stock, name).shape), 23) * 0.5

    def mapped(layer):
        orig = getattr(layer, name)

        def one(w):
            layer.update({name: w})
            try:
                return call(layer, x)
            finally:
                layer.update({name: orig})

        return lambda w: mx.vmap(one)(w)

    def loss(fn):
        return lambda w: sum((o * o).sum() for o in fn(w))

    ref, ref_grad = mapped(stock)(ws), mx.grad(loss(mapped(stock)))(ws)
    with _gpu_kernels_may_refuse():
        with mlx_fastrnn.use_impl("fast"):
            got, grad = mapped(ours)(ws), mx.grad(loss(mapped(ours)))(ws)
            mx.eval(got, grad)
        for a, b in zip(got, ref):
            assert_close(a, b, "vmap over " + name)
        assert_close(grad, ref_grad, "gradient w.r.t. the mapped " + name)


@contextlib.contextmanager
def _gpu_kernels_may_refuse():
    """On the CPU the result must be right. On a GPU the fused kernels (custom
    kernels have no vmap / jvp in MLX) may refuse instead, loudly: the known
    limitation in README.md. A wrong result fails either way."""
    try:
        yield
    except ValueError as e:
        if gpu_target() is None or "CustomKernel" not in str(e):
            raise


@pytest.mark.parametrize("length", [5, 1])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_forward_mode_jvp(kind, length):
    stock, ours = make_pair(kind, 3, 4)
    x, h = rand((2, length, 3), 28), rand((2, 4), 29)
    tx, th = rand((2, length, 3), 30), rand((2, 4), 31)
    f = lambda layer: (lambda x, h: call(layer, x, h))  # noqa: E731
    _, t_ref = mx.jvp(f(stock), [x, h], [tx, th])
    # A streaming step's fused op has a jvp (its reference step's): only the
    # sequence kernels may refuse.
    refusal_ok = _gpu_kernels_may_refuse() if length > 1 else contextlib.nullcontext()
    with refusal_ok:
        with mlx_fastrnn.use_impl("fast"):
            _, t = mx.jvp(f(ours), [x, h], [tx, th])
            mx.eval(t)
        for a, b in zip(t, t_ref):
            assert_close(a, b, "jvp tangent")


@pytest.mark.parametrize("length", [5, 1])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_second_order_gradient_correct_or_refused(kind, length):
    """grad of grad (gradient penalties, Hessian-vector products): the fast path
    must give stock's result, or refuse loudly; a silently wrong value fails."""
    stock, ours = make_pair(kind, 3, 4)
    x, h = rand((2, length, 3), 32), rand((2, 4), 33)

    def penalty(layer):
        def inner(x):
            return sum((o * o).sum() for o in call(layer, x, h))

        return lambda x: (mx.grad(inner)(x) ** 2).sum()

    ref = mx.grad(penalty(stock))(x)
    try:
        with mlx_fastrnn.use_impl("fast"):
            got = mx.grad(penalty(ours))(x)
            mx.eval(got)
    except Exception:  # noqa: BLE001 - an explicit refusal is acceptable
        return
    assert_close(got, ref, "second-order gradient wrt x", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_inside_cpu_stream(kind):
    with mx.stream(mx.cpu):
        stock, ours = make_pair(kind, 4, 5)
        x, h = rand((2, 4, 4), 23), rand((2, 5), 24)
        c = h if is_lstm(kind) else None
        out_s, g_s = forward_and_grads(stock, x, h, c)
        out_f, g_f = forward_and_grads(ours, x, h, c, impl="fast")
        assert_all_close(out_f, g_f, out_s, g_s, what="cpu stream")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_gpu_stream_matches_cpu_stock(kind):
    with mx.stream(mx.cpu):
        stock, ours = make_pair(kind, 8, 33)
        x, h = rand((3, 7, 8), 25), rand((3, 33), 26)
        c = h if is_lstm(kind) else None
        out_s, g_s = forward_and_grads(stock, x, h, c)
    with mx.stream(mx.gpu):
        out_f, g_f = forward_and_grads(ours, x, h, c, impl="fast")
        out_l, g_l = forward_and_grads(ours, x, h, c, impl="legacy")
    assert_all_close(out_f, g_f, out_s, g_s, what="gpu fast vs cpu stock", rtol=1e-4, atol=1e-5)
    assert_all_close(out_f, g_f, out_l, g_l, what="gpu fast vs gpu legacy")


@pytest.mark.parametrize("length", [3, 1])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_fast_path_does_not_call_stock(kind, length, monkeypatch):
    """Under the fast impl, float32 GRU/LSTM/RNN(tanh|relu) must not run stock's loop
    (otherwise the parity tests would compare stock with itself), streaming
    steps (length 1) included."""
    name = KINDS[kind][0]
    stock, ours = make_pair(kind, 3, 4)
    calls = []
    original = STOCK[name].__call__

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(STOCK[name], "__call__", spy)
    x = rand((2, length, 3), 27)
    forward(ours, x, impl="fast")
    assert calls == [], "fast impl fell back to the stock loop for a supported configuration"
    forward(ours, x, impl="legacy")
    assert calls == [1], "legacy impl must run the stock code"
