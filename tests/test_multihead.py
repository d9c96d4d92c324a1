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


@pytest.mark.parametrize("kind", list(CLASSES))
def test_vmap_over_inputs_and_weights_is_a_loop(kind):
    """mx.vmap over the input, the recurrent weights R (an ensemble) or GRU's bhn: the heads
    stay separate problems, each map index's (its own R: problems of their own); outputs
    and gradients as a Python loop over the mapped items."""
    layer = _layer(kind, 3, 8, 2)
    x = mx.random.normal((2, 5, 3), key=mx.random.key(1))

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    cases = [("x", mx.random.normal((3, 2, 5, 3), key=mx.random.key(2)))]
    for name in ("R", "bhn") if kind == "gru" else ("R",):
        orig = getattr(layer, name)
        cases.append((name, orig[None] + 0.3 * mx.random.normal((3, *orig.shape), key=mx.random.key(3))))
    for name, items in cases:
        if name == "x":
            def call(v):
                return first(layer(v))
        else:
            def call(v, name=name, orig=getattr(layer, name)):
                layer.update({name: v})
                try:
                    return first(layer(x))
                finally:
                    layer.update({name: orig})
        got = mx.vmap(call)(items)
        ref = mx.stack([call(v) for v in items])
        assert mx.allclose(got, ref, rtol=1e-5, atol=1e-6).item(), name
        g = mx.grad(lambda v: (mx.vmap(call)(v) ** 2).sum())(items)
        g_ref = mx.grad(lambda v: sum((call(w) ** 2).sum() for w in v))(items)
        assert mx.allclose(g, g_ref, rtol=1e-4, atol=1e-5).item(), name


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
    with pytest.raises(ValueError, match="four arrays"):
        layer(mx.zeros((2, 3, 4)), states=(mx.zeros((2, 6)), None, None, None))


def test_slstm_large_inputs_stay_finite_and_nan_propagates():
    layer = _layer("slstm", 3, 4, 2)
    x = mx.array([[[80.0, -80.0, 80.0], [-80.0, 80.0, -80.0], [1e4, -1e4, 3.0]]])
    y, c, n, m = layer(x)
    assert all(mx.isfinite(s).all().item() for s in (y, c, n, m))
    y_nan = layer(mx.where(mx.arange(3)[None, :, None] == 1, mx.nan, x))[0]
    assert not mx.isnan(y_nan[:, 0]).any().item() and mx.isnan(y_nan[:, 1:]).all().item()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(CLASSES))
@pytest.mark.parametrize("batch,length,hidden,heads", [
    (4, 24, 64, 4), (2, 40, 128, 2),
    (2, 12, 1024, 4),  # heads of 256 as 4 problems of the tiled class (the dense 1024 fits no float32 plan)
    (1, 5, 4096, 16),  # 16 heads of 256: no grid holds them all; two launches of 8 problems
])
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


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lstm", "slstm"])
def test_gpu_heads_on_the_per_step_loop_match_cpu(kind, monkeypatch):
    """Without the whole-sequence kernels (``MLX_FASTRNN_PERSISTENT=0``) the heads run
    the per-step cells as problems, one batched matmul per step: against the CPU."""
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT", "0")
    test_gpu_matches_cpu(kind, 2, 6, 256, 4)


@pytest.mark.gpu
def test_gpu_slstm_backward_ept_fallback_matches_cpu(monkeypatch):
    """``MLX_FASTRNN_PERSISTENT_EPT_FALLBACK`` (default on): 16 sLSTM heads of 256 at B = 64 run as two
    launches of 8 whose backward holds four elements per thread (no plan holds them at
    the sLSTM's two): outputs and every gradient against the CPU."""
    from mlx_fastrnn.kernels import classes as C

    monkeypatch.delenv("MLX_FASTRNN_PERSISTENT_EPT_FALLBACK", raising=False)
    xp, w = C.Operand((4, 8 * 64, 4 * 256), mx.float32, 3), C.Operand((8, 4 * 256, 256), mx.float32, 3)
    klass, p = C.choose("backward", "slstm", xp, w)
    assert klass == "tiled" and p.EPT > 2
    all16 = (C.Operand((4, 16 * 64, 4 * 256), mx.float32, 3), C.Operand((16, 4 * 256, 256), mx.float32, 3))
    assert C.accepts("slstm", xp, w, kind="heads") and not C.accepts("slstm", *all16, kind="heads")
    test_gpu_matches_cpu("slstm", 64, 4, 4096, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lstm", "slstm"])
def test_gpu_heads_forward_kernel_backward_per_step_match_cpu(kind, monkeypatch):
    """Heads whose backward no whole-sequence kernel takes (e.g. the sLSTM's, at most
    two elements per thread, where its forward takes four): the forward on the kernel,
    the backward on ``recurrence``'s per-step loop of problems; against the CPU."""
    from mlx_fastrnn.kernels import classes as C

    real = C.choose
    monkeypatch.setattr(C, "choose", lambda direction, *a, **k: (None, None) if direction == "backward"
                        else real(direction, *a, **k))
    test_gpu_matches_cpu(kind, 2, 6, 256, 4)


@pytest.mark.parametrize("head_major", [False, True], ids=["gate_major", "head_major"])
@pytest.mark.parametrize("cell_name,heads", [("lstm", 4), ("slstm", 3), ("rnn_tanh", 5)])
def test_heads_in_two_launches_match_the_dense_block_diagonal(cell_name, heads, head_major):
    """Where one launch cannot take all heads but each half can (``ops.heads._launches``;
    here a stand-in ``accepts`` that takes at most ceil(N/2) problems), the heads run as
    two recurrences whose outputs are joined: the same state sequences and every
    gradient (xp, R, the initial states) as the dense block-diagonal W_h; also with
    head-major inputs and outputs (``head_major=True``, what ``flashrnn`` passes), on
    the two launches, on one launch (all heads: a view of the rows) and on the dense W_h."""
    import dataclasses

    from mlx_fastrnn.cells import LSTM_CELL, RNN_TANH_CELL, SLSTM_CELL
    from mlx_fastrnn.ops import heads as H

    cell = {"lstm": LSTM_CELL, "slstm": SLSTM_CELL, "rnn_tanh": RNN_TANH_CELL}[cell_name]
    half = (heads + 1) // 2

    def takes_half(xp, w_h, varlen=False, kind="directions", forward_only=False):
        return w_h.ndim == 3 and w_h.shape[0] <= half and kind == "heads"

    split = dataclasses.replace(cell.reference_steps, accepts=takes_half)
    g, d, length, batch = cell.num_gates, 4, 5, 3
    ks = mx.random.split(mx.random.key(11), 4)
    r = mx.random.normal((g, heads, d, d), key=ks[0]) / d ** 0.5
    xp = mx.random.normal((length, batch, g * heads * d), key=ks[1])
    s0 = [mx.random.normal((batch, heads * d), key=k) * 0.5 for k in mx.random.split(ks[2], cell.num_states)]
    if cell_name == "slstm":
        s0[2] = 1 + mx.abs(s0[2])
    given = (True,) * cell.num_states
    cot = [mx.random.normal((length, batch, heads * d), key=k) for k in mx.random.split(ks[3], cell.num_states)]
    assert H._launches(split, xp, g, heads, d) == [(0, half), (half, heads)]
    assert H._launches(dataclasses.replace(split, accepts=lambda *a, **k: False), xp, g, heads, d) is None

    def loss(steps, hm=False):
        def f(xp, r, *s0):
            if hm:  # [L, B, G*N*D] -> [L, N, B, G*D]; sequences back from [L, N, B, D]
                xh = xp.reshape(length, batch, g, heads, d).transpose(0, 3, 1, 2, 4).reshape(
                    length, heads, batch, g * d)
                seqs = H.head_recurrence(cell, steps, xh, r, list(s0), (), given, head_major=True)
                assert all(tuple(q.shape) == (length, heads, batch, d) for q in seqs)
                seqs = [q.swapaxes(1, 2).reshape(length, batch, heads * d) for q in seqs]
            else:
                seqs = H.head_recurrence(cell, steps, xp, r, list(s0), (), given)
            return sum((a * c).sum() for a, c in zip(seqs, cot)), list(seqs)
        return mx.value_and_grad(f, argnums=tuple(range(2 + cell.num_states)))(xp, r, *s0)

    (_, want), g_want = loss(cell.reference_steps)  # accepts None: the dense block-diagonal W_h
    one = dataclasses.replace(cell.reference_steps, accepts=lambda xp, w_h, varlen=False, kind="", forward_only=False:
                              kind == "heads")
    for steps in ((split, one, cell.reference_steps) if head_major else (split,)):
        (_, got), g_got = loss(steps, head_major)
        for a, b in zip(got, want):
            assert mx.allclose(a, b, rtol=1e-5, atol=1e-6).item()
        for i, (a, b) in enumerate(zip(g_got, g_want)):
            assert mx.allclose(a, b, rtol=1e-4, atol=1e-5).item(), i


@pytest.mark.parametrize("steps_kind", ["reference", "compiled", "host:metal", "host:cuda"])
@pytest.mark.parametrize("cell_name,h0_given", [("lstm", False), ("slstm", True), ("rnn_tanh", True),
                                                ("gru", True)])
def test_per_problem_step_loop_matches_the_dense_block_diagonal(cell_name, h0_given, steps_kind):
    """Heads as problems on the step loop (``ops.sequence.recurrence`` with a
    stacked [N, G*D, D] W_h: one batched matmul per step, what the per-step cells
    run when no whole-sequence kernel takes the heads, and the CPU's compiled steps
    with their whole-sequence backward; GRU's per-problem bhn as one row each of the
    problem's rows, which the fused step kernels read per row: ``host:metal`` /
    ``host:cuda``, their exact sources on the CPU): the same state sequences and every
    gradient (xp, each head's W_h, the initial states, bhn) as the dense block-diagonal
    W_h on the same steps."""
    from mlx_fastrnn.cells import GRU_CELL, LSTM_CELL, RNN_TANH_CELL, SLSTM_CELL
    from mlx_fastrnn.ops.heads import block_diagonal as dense
    from mlx_fastrnn.ops.sequence import recurrence

    cell = {"lstm": LSTM_CELL, "slstm": SLSTM_CELL, "rnn_tanh": RNN_TANH_CELL, "gru": GRU_CELL}[cell_name]
    # reference: forward and backward steps; compiled: a forward step and the
    # whole-sequence backward (the CPU's); host:*: the fused step kernels; none has
    # whole-sequence kernels
    if steps_kind.startswith("host:"):
        steps = cell.kernel_steps(steps_kind, False)
    else:
        steps = cell.reference_steps if steps_kind == "reference" else cell.compiled_steps
    assert (steps.backward_step is None) == (steps_kind == "compiled")
    g, n, d, length, batch = cell.num_gates, 3, 5, 6, 2
    ks = mx.random.split(mx.random.key(7), 5)
    r = mx.random.normal((g, n, d, d), key=ks[0]) / d ** 0.5
    xp = mx.random.normal((length, batch, g * n * d), key=ks[1])
    s0 = [mx.random.normal((batch, n * d), key=k) * 0.5 for k in mx.random.split(ks[2], cell.num_states)]
    if cell_name == "slstm":  # normalizer n >= 1, stabilizer m finite
        s0[2] = 1 + mx.abs(s0[2])
    given = (h0_given,) + (True,) * (cell.num_states - 1)
    s0 = [s if gv else mx.zeros_like(s) for s, gv in zip(s0, given)]
    prm = (mx.random.normal((n * d,), key=ks[4]),) if cell_name == "gru" else ()  # bhn, head-major
    cot = [mx.random.normal((length, batch, n * d), key=k) for k in mx.random.split(ks[3], cell.num_states)]

    def heads_major(a):  # [..., B, G*N*D] or [B, N*D] -> rows head-major [..., N*B, G*D]
        lead, gates = a.shape[:-2], a.shape[-1] // (n * d)
        a = a.reshape(*lead, batch, gates, n, d)
        return mx.moveaxis(a, -2, -4).reshape(*lead, n * batch, gates * d)

    def by_problems(xp, r, *rest):
        s0, prm = rest[:cell.num_states], rest[cell.num_states:]
        wh = r.transpose(1, 0, 2, 3).reshape(n, g * d, d)
        seqs = recurrence(cell, steps, heads_major(xp), wh, [heads_major(s) for s in s0],
                          tuple(p.reshape(n, d) for p in prm), given)
        back = [s.reshape(length, n, batch, d).swapaxes(1, 2).reshape(length, batch, n * d) for s in seqs]
        return sum((a * c).sum() for a, c in zip(back, cot)), back

    def by_dense(xp, r, *rest):
        s0, prm = rest[:cell.num_states], rest[cell.num_states:]
        seqs = recurrence(cell, steps, xp, dense(r), list(s0), tuple(prm), given)
        return sum((a * c).sum() for a, c in zip(seqs, cot)), list(seqs)

    argnums = tuple(range(2 + cell.num_states + len(prm)))
    (_, got), g_got = mx.value_and_grad(by_problems, argnums=argnums)(xp, r, *s0, *prm)
    (_, want), g_want = mx.value_and_grad(by_dense, argnums=argnums)(xp, r, *s0, *prm)
    for a, b in zip(got, want):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-6).item()
    assert len(g_got) == len(g_want) == len(argnums)
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        if 2 <= i < 2 + cell.num_states and not given[i - 2]:
            continue
        assert mx.allclose(a, b, rtol=1e-4, atol=1e-5).item(), i


def test_per_problem_step_loop_refuses_steps_without_a_backward():
    """Steps with neither a per-step nor a whole-sequence backward have no per-problem
    step loop."""
    import dataclasses

    from mlx_fastrnn.cells import LSTM_CELL
    from mlx_fastrnn.ops.sequence import recurrence

    forward_only = dataclasses.replace(LSTM_CELL.compiled_steps, backward_sequence=None)
    with pytest.raises(RuntimeError, match="multi-problem"):
        mx.eval(recurrence(LSTM_CELL, forward_only, mx.zeros((2, 4, 16)), mx.zeros((2, 16, 4)),
                           [mx.zeros((4, 4))] * 2, (), (False, False)))
