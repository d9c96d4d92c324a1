"""Multi-head layers (mlx_fastrnn.multihead): outputs, states and every gradient
against ``flashrnn(backend="vanilla")`` (the FlashRNN-vanilla-equivalent reference loop, itself
tested against the package and golden arrays in test_flashrnn.py) on the same
numbers, through MLX autodiff of the reference; on a GPU, against the CPU."""

import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_fastrnn.multihead import MultiHeadGRU, MultiHeadLSTM, MultiHeadRNN, SLSTM, block_diagonal
from mlx_fastrnn.ops.flashrnn import flashrnn

CLASSES = {"slstm": SLSTM, "lstm": MultiHeadLSTM, "gru": MultiHeadGRU, "elman": MultiHeadRNN}
GATES = {"slstm": 4, "lstm": 4, "gru": 3, "elman": 1}
STATES = {"slstm": 4, "lstm": 2, "gru": 1, "elman": 1}


def _layer(kind, inp, hidden, heads, bias=True, seed=0):
    mx.random.seed(seed)
    layer = CLASSES[kind](inp, hidden, num_heads=heads, bias=bias)
    if bias and kind != "gru":  # a visible bias (the default init is small)
        layer.bias = mx.random.normal(layer.bias.shape) * 0.5
    mx.eval(layer.parameters())
    return layer


def _via_reference(kind, params, x, states, heads):
    """The layer's math through flashrnn(): its layouts and gate orders."""
    batch_shape, length = x.shape[:-2], x.shape[-2]
    xb = x.reshape(-1, length, x.shape[-1])
    b = xb.shape[0]
    hidden = params["Wx"].shape[0] // GATES[kind]
    d = hidden // heads
    g = GATES[kind]
    r = params["R"]
    if kind == "gru":
        xp = xb @ params["Wx"].T + (params["b"] if "b" in params else 0)
        r = mx.stack([r[2], r[0], r[1]])  # FlashRNN's GRU R gates: (g, r, z)
        bhn = params["bhn"].reshape(1, heads, d) if "bhn" in params else mx.zeros((1, heads, d))
        bias = mx.concatenate([bhn, mx.zeros((3, heads, d))])
    else:
        xp = xb @ params["Wx"].T
        bias = params["bias"].reshape(g, heads, d) if "bias" in params else mx.zeros((g, heads, d))
    st = None
    if states is not None:
        st = mx.stack([mx.broadcast_to(s, (*batch_shape, hidden)).reshape(b, 1, heads, d) for s in states])
    seq, _ = flashrnn(xp.reshape(b, length, g, heads, d), r, bias, st, function=kind, backend="vanilla")
    return tuple(s.reshape(*batch_shape, length, hidden) for s in seq)


def _call(layer, kind, x, states):
    if kind == "slstm":
        return layer(x, states)
    if kind == "lstm":
        return layer(x, *(states or (None, None)))
    return (layer(x, states[0] if states else None),)


def _loss(outs, key):
    total = mx.array(0.0)
    for i, o in enumerate(outs):
        total = total + (o * mx.random.normal(o.shape, key=mx.random.key(key + i))).sum()
    return total


def _compare(kind, batch, length, inp, hidden, heads, bias=True, with_states=False, tol=1e-5):
    layer = _layer(kind, inp, hidden, heads, bias)
    shape = (*batch, length, inp)
    x = mx.random.normal(shape, key=mx.random.key(1))
    states = None
    if with_states:
        ks = mx.random.split(mx.random.key(2), STATES[kind])
        states = [mx.random.normal((*batch, hidden), key=k) * 0.5 for k in ks]
        if kind == "slstm":  # a reachable sLSTM state: n >= 1
            states[2] = 1.0 + mx.abs(states[2])
        states = tuple(states)

    def ours(params, x, states):
        layer.update(params)
        outs = _call(layer, kind, x, states)
        return _loss(outs, 7), outs

    def ref(params, x, states):
        outs = _via_reference(kind, params, x, states, heads)[: len(_call(layer, kind, x, states))]
        return _loss(outs, 7), outs

    args = (layer.parameters(), x, states)
    argnums = (0, 1, 2) if with_states else (0, 1)
    (lo, outs_o), g_o = mx.value_and_grad(ours, argnums=argnums)(*args)
    (lr, outs_r), g_r = mx.value_and_grad(ref, argnums=argnums)(*args)
    for a, b in zip(outs_o, outs_r):
        assert a.shape == b.shape
        scale = max(1.0, mx.abs(b).max().item())
        assert mx.abs(a - b).max().item() <= tol * scale, f"{kind} output"
    for (k, a), (_, b) in zip(tree_flatten(g_o), tree_flatten(g_r)):
        scale = max(1.0, mx.abs(b).max().item())
        assert mx.abs(a - b).max().item() <= 1e-4 * scale, f"{kind} grad {k}"


@pytest.mark.parametrize("kind", list(CLASSES))
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_matches_flashrnn_reference(kind, heads):
    _compare(kind, (3,), 7, 5, 8, heads)


@pytest.mark.parametrize("kind", list(CLASSES))
@pytest.mark.parametrize("case", ["unbatched", "states", "no_bias", "odd"])
def test_options(kind, case):
    if case == "unbatched":
        _compare(kind, (), 6, 4, 6, 3)
    elif case == "states":
        _compare(kind, (2,), 5, 4, 6, 2, with_states=True)
    elif case == "no_bias":
        _compare(kind, (2,), 5, 3, 4, 2, bias=False)
    else:
        _compare(kind, (2, 3), 4, 3, 15, 5, with_states=True)


def test_block_diagonal_gradient_stays_in_the_blocks():
    r = mx.random.normal((2, 3, 2, 2))
    g = mx.grad(lambda r: (block_diagonal(r) * mx.arange(2 * 6 * 6).reshape(12, 6)).sum())(r)
    dense = mx.arange(72).reshape(2, 3, 2, 3, 2).astype(mx.float32)
    want = mx.stack([mx.stack([dense[a, k, :, k, :] for k in range(3)]) for a in range(2)])
    assert mx.array_equal(g, want)


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        SLSTM(4, 6, num_heads=4)
    with pytest.raises(ValueError, match="positive int"):
        MultiHeadLSTM(4, 0)
    with pytest.raises(ValueError, match="nonlinearity"):
        MultiHeadRNN(4, 4, nonlinearity="gelu")
    layer = SLSTM(4, 6, num_heads=2)
    with pytest.raises(ValueError, match="expects input"):
        layer(mx.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="tuple"):
        layer(mx.zeros((2, 3, 4)), states=mx.zeros((2, 6)))
    with pytest.raises(ValueError, match="share one shape"):
        layer(mx.zeros((2, 3, 4)), states=(mx.zeros((2, 6)),) * 3 + (mx.zeros((1, 6)),))


def test_slstm_large_inputs_stay_finite_and_nan_propagates():
    layer = _layer("slstm", 3, 4, 2)
    x = mx.array([[[80.0, -80.0, 80.0], [-80.0, 80.0, -80.0], [1e4, -1e4, 3.0]]])
    y, c, n, m = layer(x)
    assert all(mx.isfinite(s).all().item() for s in (y, c, n, m))
    y_nan = layer(mx.where(mx.arange(3)[None, :, None] == 1, mx.nan, x))[0]
    assert not mx.isnan(y_nan[:, 0]).any().item() and mx.isnan(y_nan[:, 1:]).all().item()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(CLASSES))
@pytest.mark.parametrize("batch,length,hidden,heads", [(4, 24, 64, 4), (2, 40, 128, 2)])
def test_gpu_matches_cpu(kind, batch, length, hidden, heads):
    layer = _layer(kind, 32, hidden, heads)
    x = mx.random.normal((batch, length, 32), key=mx.random.key(3))

    def run():
        def loss(params, x):
            layer.update(params)
            return _loss(_call(layer, kind, x, None), 11)
        value, grads = mx.value_and_grad(loss, argnums=(0, 1))(layer.parameters(), x)
        outs = _call(layer, kind, x, None)
        mx.eval(value, grads, outs)
        return [value, *outs, *(v for _, v in tree_flatten(grads))]

    got = run()
    prev = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        want = run()
    finally:
        mx.set_default_device(prev)
    for a, b in zip(got, want):
        scale = max(1.0, mx.abs(b).max().item())
        assert mx.abs(a - b).max().item() <= 1e-4 * scale
