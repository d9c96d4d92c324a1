"""mlx_fastrnn.pytorch on a GPU: outputs, final states and every gradient equal
the same layer run on the CPU (whose torch semantics the CPU tests check), for
shapes that reach the persistent kernels and the per-step cells, with lengths,
given states, both directions, stacked layers, and bfloat16 against a float32
reference. Skipped without a GPU."""

import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_fastrnn import use_impl
from mlx_fastrnn.pytorch import GRU, LSTM, RNN

pytestmark = pytest.mark.gpu

CLASSES = {"lstm": LSTM, "gru": GRU, "rnn": RNN, "rnn_relu": RNN}


def _layer(kind, input_size, hidden, **kw):
    if kind == "rnn_relu":
        kw["nonlinearity"] = "relu"
    mx.random.seed(3)
    layer = CLASSES[kind](input_size, hidden, **kw)
    mx.eval(layer.parameters())
    return layer


def _inputs(kind, layer, batch, length, with_hx, with_lengths):
    mx.random.seed(4)
    d = layer.num_directions * layer.num_layers
    shape = (batch, length, layer.input_size) if layer.batch_first else (length, batch, layer.input_size)
    x = mx.random.normal(shape)
    hx = None
    if with_hx:
        h = mx.random.normal((d, batch, layer.proj_size or layer.hidden_size))
        hx = (h, mx.random.normal((d, batch, layer.hidden_size))) if kind == "lstm" else h
    lengths = None
    if with_lengths:
        lengths = mx.array([length] + [max(1, (length * (i + 1)) // (batch + 1)) for i in range(batch - 1)])
    return x, hx, lengths


def _loss_and_grads(layer, x, hx, lengths):
    mx.random.seed(5)

    def loss(params, x, hx):
        layer.update(params)
        out, st = layer(x, hx, lengths)
        states = st if isinstance(st, tuple) else (st,)
        w = mx.random.normal(out.shape, key=mx.random.key(6)).astype(out.dtype)
        total = (out * w).astype(mx.float32).sum()
        for s in states:
            total = total + (s.astype(mx.float32) ** 2).sum()
        return total, (out, *states)

    argnums = (0, 1, 2) if hx is not None else (0, 1)
    (value, outs), grads = mx.value_and_grad(loss, argnums=argnums)(layer.parameters(), x, hx)
    flat = [("loss", value)] + [(f"out{i}", o) for i, o in enumerate(outs)]
    flat += [("d" + k, v) for k, v in tree_flatten(grads[0])] + [("dx", grads[1])]
    if hx is not None:
        flat += [(f"dhx{i}", g) for i, g in enumerate(grads[2] if isinstance(grads[2], tuple) else (grads[2],))]
    mx.eval([v for _, v in flat])
    return dict(flat)


def _on_cpu(fn):
    prev = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        return fn()
    finally:
        mx.set_default_device(prev)


def _assert_close(got, want, rtol, atol_scale, what):
    assert got.keys() == want.keys()
    for k in want:
        g, w = got[k].astype(mx.float32), want[k].astype(mx.float32)
        assert g.shape == w.shape, (what, k)
        scale = max(1.0, mx.abs(w).max().item())
        err = mx.abs(g - w).max().item()
        assert err <= atol_scale * scale + rtol * mx.abs(w).max().item(), f"{what}: {k} max err {err:.3g}"


CASES = [
    # kind, batch, length, input, hidden, layer kwargs, hx, lengths
    ("lstm", 4, 24, 32, 64, dict(num_layers=2, bidirectional=True), True, True),
    ("gru", 4, 24, 32, 64, dict(num_layers=2, bidirectional=True, batch_first=True), False, True),
    ("rnn", 3, 17, 16, 48, dict(num_layers=3, bidirectional=True), True, False),
    ("rnn_relu", 2, 9, 8, 32, dict(num_layers=2), False, True),
    ("lstm", 1, 40, 64, 128, dict(bidirectional=True), False, False),
    ("gru", 5, 12, 24, 40, dict(bias=False, bidirectional=True), True, True),
    ("lstm", 3, 10, 12, 20, dict(num_layers=2, proj_size=7, bidirectional=True), True, True),
]


@pytest.mark.parametrize("kind,batch,length,inp,hidden,kw,with_hx,with_lengths", CASES,
                         ids=[f"{c[0]}-{c[1]}x{c[2]}x{c[4]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("impl", ["fast", "fast-stacked", "cell"])
def test_gpu_matches_cpu(kind, batch, length, inp, hidden, kw, with_hx, with_lengths, impl, monkeypatch):
    layer = _layer(kind, inp, hidden, **kw)
    x, hx, lengths = _inputs(kind, layer, batch, length, with_hx, with_lengths)
    want = _on_cpu(lambda: _loss_and_grads(layer, x, hx, lengths))
    # fast-stacked: both directions in one two-problem persistent launch
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_PROBLEMS", "1" if impl == "fast-stacked" else "0")
    impl = "fast" if impl == "fast-stacked" else impl
    with use_impl(impl):
        got = _loss_and_grads(layer, x, hx, lengths)
    _assert_close(got, want, rtol=1e-4, atol_scale=2e-5, what=f"{kind} {impl}")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gpu_bfloat16_close_to_float32(kind):
    layer = _layer(kind, 32, 64, num_layers=2, bidirectional=True)
    x, hx, lengths = _inputs(kind, layer, 4, 16, True, True)
    layer.set_dtype(mx.bfloat16)
    ref = _layer(kind, 32, 64, num_layers=2, bidirectional=True)
    ref.load_weights([(k, v.astype(mx.float32)) for k, v in tree_flatten(layer.parameters())])
    xb = x.astype(mx.bfloat16)
    hxb = tuple(h.astype(mx.bfloat16) for h in hx) if isinstance(hx, tuple) else hx.astype(mx.bfloat16)
    got = _loss_and_grads(layer, xb, hxb, lengths)
    assert got["out0"].dtype == mx.bfloat16
    want = _on_cpu(lambda: _loss_and_grads(
        ref, xb.astype(mx.float32),
        tuple(h.astype(mx.float32) for h in hxb) if isinstance(hxb, tuple) else hxb.astype(mx.float32),
        lengths))
    for k in ("out0", "out1"):
        g, w = got[k].astype(mx.float32), want[k]
        err = mx.abs(g - w).max().item()
        assert err <= 3e-2 * max(1.0, mx.abs(w).max().item()), f"{kind} bf16 {k}: {err}"
