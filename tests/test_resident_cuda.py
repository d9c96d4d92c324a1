"""The resident (latency-class) CUDA kernels on a real GPU: parity of outputs
and every gradient with the cells' reference steps (computed on the CPU
stream), several problems in one launch, the class choice, and the drop-in
layers on each class. Skipped unless MLX's CUDA backend is available."""

import pytest

import mlx.core as mx

import persistent_reference as ref
from mlx_fastrnn.kernels import classes as C
from mlx_fastrnn.kernels import persistent as P
from mlx_fastrnn.kernels import resident as R


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ref.cuda_available(), reason="needs MLX's CUDA backend")]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("MLX_FASTRNN_PERSISTENT", "MLX_FASTRNN_KERNEL_CLASS", "MLX_FASTRNN_PERSISTENT_PROBLEMS"):
        monkeypatch.delenv(k, raising=False)


def _check(cell, L, B, H, xdt, zero, problems=1, ksp=1, wreg=False):
    parts = [ref.problem(cell, L, B, H, xdt, seed=3 + k) for k in range(problems)]
    if zero:
        parts = [(x, w, tuple(mx.zeros_like(s) for s in s0), q) for x, w, s0, q in parts]
    xp = mx.concatenate([p[0] for p in parts], axis=1)
    w = parts[0][1] if problems == 1 else mx.stack([p[1] for p in parts])
    s0 = tuple(mx.concatenate(ss, axis=0) for ss in zip(*(p[2] for p in parts)))
    params = parts[0][3] if problems == 1 else tuple(mx.stack(qs) for qs in zip(*(p[3] for p in parts)))
    pf = R.select("forward", cell, xp, w)
    pb = R.select("backward", cell, xp, w)
    if ksp > 1:  # the K-split of the same splits
        limits = P.device_limits()
        pf = R.plan("forward", cell, H, B, limits, xdt, problems, pf.BB, pf.RPT, ksp=ksp)
        pb = R.plan("backward", cell, H, B, limits, xdt, problems, pb.BB, pb.RPT, ksp=ksp)
    assert pf is not None and pb is not None and pf.NP == problems and pf.KSP == pb.KSP == ksp
    if wreg:  # each thread's share of W_h in registers
        pf, pb = (R.with_registers(p, P.device_limits()) for p in (pf, pb))
        assert pf.WREG and pb.WREG
    got = R.run_forward(pf, xp, w, s0, params, zero)
    mx.eval(got)
    need = not zero
    seqs, hp = got[:-1], got[-1]
    prevs = ref.prevs_of(s0, seqs)
    d_outs = ref.cotangents(cell, L, problems * B, H)
    dx, dhp, d0 = R.run_backward(pb, d_outs, xp, hp, prevs, params, w, need)
    mx.eval(dx, dhp, d0)
    for k, (pxp, pw, ps0, pprm) in enumerate(parts):
        rows = slice(k * B, (k + 1) * B)
        w_ref = pw.astype(pf.w_dtype).astype(mx.float32)  # the W_h each kernel reads
        expected = ref.on_cpu(ref.forward, cell, pxp, w_ref, ps0, pprm, zero)
        w_ref = pw.astype(pb.w_dtype).astype(mx.float32)
        for i, (a, e) in enumerate(zip(got, expected)):
            err = ref.max_rel_err(a[:, rows], e)
            assert err < ref.gpu_tol(L), f"forward output {i} of problem {k}: rel err {err:.2e} ({pf})"
        rdx, rdhp, rd0 = ref.on_cpu(ref.backward, cell, tuple(d[:, rows] for d in d_outs), pxp, hp[:, rows],
                                 tuple(q[:, rows] for q in prevs), pprm, w_ref, need)
        assert ref.max_rel_err(dx[:, rows], rdx) < ref.gpu_tol(L), pb
        assert ref.max_rel_err(dhp[:, rows], rdhp) < ref.gpu_tol(L), pb
        if need:
            for a, e in zip(d0, rd0):
                assert ref.max_rel_err(a[rows], e) < ref.gpu_tol(L), pb
        else:
            assert d0 is None


@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("xdt", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("L,B,H", [(1, 1, 1), (3, 1, 33), (7, 5, 64), (12, 33, 100), (100, 8, 32)])
def test_resident_parity(cell, xdt, L, B, H):
    _check(cell, L, B, H, xdt, False)


@pytest.mark.parametrize("cell,H", [("lstm", 128), ("slstm", 128), ("gru", 160)])
def test_resident_float16_weights(cell, H):
    """A float16 launch whose W_h does not fit as float32 holds it as float16 (exact for a
    float16 layer's weights), forward and backward."""
    xp, w, _, _ = ref.problem(cell, 2, 3, H, mx.float16)
    assert R.select("forward", cell, xp, w).w_dtype == R.select("backward", cell, xp, w).w_dtype == mx.float16
    _check(cell, 9, 3, H, mx.float16, False)


@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("ksp", [2, 4, 8])
def test_resident_k_split_parity(cell, ksp):
    """Each unit's projection split over KSP threads (forward and backward), plain
    and two problems, against the CPU reference."""
    _check(cell, 20, 3, 40, mx.float32, False, ksp=ksp)
    _check(cell, 7, 2, 24, mx.bfloat16, True, problems=2, ksp=ksp)


@pytest.mark.parametrize("cell", ref.CELL_NAMES)
def test_resident_w_in_registers_parity(cell, monkeypatch):
    """``WREG`` (each thread's share of W_h in registers), forward and backward,
    plain and two problems, one thread per unit and K-splits, against the CPU."""
    monkeypatch.setenv("MLX_FASTRNN_RESIDENT_WREG", "1")
    _check(cell, 20, 3, 16, mx.float32, False, wreg=True)
    _check(cell, 30, 8, 64, mx.float32, False, ksp=4, wreg=True)
    _check(cell, 7, 2, 24, mx.bfloat16, True, problems=2, ksp=2, wreg=True)


@pytest.mark.parametrize("cell", ref.CELL_NAMES)
def test_resident_parity_zero_state_and_problems(cell):
    _check(cell, 9, 3, 48, mx.float32, True, problems=4)


def test_resident_bf16_weights_for_half_inputs():
    # LSTM H=160: float32 W_h (400 KB) does not fit one block, bfloat16 (200 KB) does
    _check("lstm", 6, 2, 160, mx.bfloat16, False)


@pytest.mark.parametrize("cell,L,B,H,xdt,rev,problems,interleaved", [
    ("gru", 30, 9, 128, mx.float32, 1, 1, False),
    ("lstm", 25, 4, 64, mx.bfloat16, 0b10, 2, False),
    ("lstm", 25, 4, 64, mx.bfloat16, 0b10, 2, True),
    ("rnn_relu", 12, 3, 200, mx.float32, 0, 1, False),
    ("slstm", 10, 2, 48, mx.float32, 0b10, 2, False),
    ("gru", 20, 3, 96, mx.float32, 0b10, 2, True),
])
def test_resident_varlen_parity(cell, L, B, H, xdt, rev, problems, interleaved):
    """Lengths and directions inside the resident kernels on the GPU against the
    masked reference (CPU stream) and its vjp; ``interleaved``: x, out, dx and
    the out cotangent problem-interleaved (``XIL``)."""
    rows = B * problems
    lens = [L] + [max(1, (7 * r) % (L + 1)) for r in range(1, rows)]

    def forward(xp, w, *args, lens, rev, **kw):
        p = R.select("forward", cell, xp, w)
        assert p is not None
        out = R.run_forward(p, xp, w, *args, lens=lens, rev=rev, **kw)
        mx.eval(out)
        return out

    def backward(d_outs, xp, hp, prevs, params, w, need, lens, rev, d_out, **kw):
        p = R.select("backward", cell, xp, w)
        assert p is not None
        out = R.run_backward(p, d_outs, xp, hp, prevs, params, w, need, lens=lens, rev=rev, d_out=d_out, **kw)
        mx.eval(out)
        return out

    ref.check_varlen(cell, L, B, H, xdt, False, lens, rev, problems, forward, backward, on=ref.on_cpu,
                     tol=(ref.gpu_tol(L), 5 * ref.gpu_tol(L)), interleaved=interleaved)


def test_choice_and_override(monkeypatch):
    xp, w, s0, params = ref.problem("lstm", 4, 2, 64, mx.float32)
    assert C.choose("forward", "lstm", xp, w)[0] == "resident"
    monkeypatch.setenv("MLX_FASTRNN_KERNEL_CLASS", "tiled")
    assert C.choose("forward", "lstm", xp, w)[0] == "tiled"
    big = ref.problem("lstm", 4, 2, 512, mx.float32)
    monkeypatch.setenv("MLX_FASTRNN_KERNEL_CLASS", "resident")
    assert C.choose("forward", "lstm", big[0], big[1])[0] == "tiled"  # does not fit one block


@pytest.mark.parametrize("klass", ["resident", "tiled"])
@pytest.mark.parametrize("name", ["GRU", "LSTM", "RNN"])
def test_layers_on_each_class(monkeypatch, klass, name):
    """The drop-in layer on each class against the stock layer (legacy),
    outputs and every gradient."""
    import mlx.nn as nn

    import mlx_fastrnn

    monkeypatch.setenv("MLX_FASTRNN_KERNEL_CLASS", klass)
    mx.random.seed(0)
    layer = getattr(mlx_fastrnn, name)(24, 48)
    stock = getattr(nn, name)(24, 48)
    stock.update(layer.parameters())
    x = mx.random.normal((3, 20, 24))

    def loss(model, x):
        out = model(x)
        out = out if isinstance(out, mx.array) else out[0] + 0.5 * out[1]
        return (out * mx.cos(mx.arange(out.size).reshape(out.shape))).sum()

    with mlx_fastrnn.use_impl("fast"):
        v, g = nn.value_and_grad(layer, loss)(layer, x)
        gx = mx.grad(lambda x: loss(layer, x))(x)
    with mx.stream(mx.cpu):
        v0, g0 = nn.value_and_grad(stock, loss)(stock, x)
        gx0 = mx.grad(lambda x: loss(stock, x))(x)
    assert abs(v.item() - v0.item()) <= 1e-4 * max(1.0, abs(v0.item()))
    for k, a in _flat(g):
        assert ref.max_rel_err(a, dict(_flat(g0))[k]) < 1e-4, k
    assert ref.max_rel_err(gx, gx0) < 1e-4


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)
