"""The sLSTM cell (mlx_fastrnn/cells/slstm): the hand-written adjoint against
MLX autodiff of the reference step, the sequence backward through the
recurrence driver, and the fused step kernels (the exact Metal and CUDA
sources, compiled for the host by mlx_fastrnn.kernels.host_harness) against
the reference steps, as tests/test_kernels_host.py does for the other cells.

States are ``(y, c, n, m)``. A "fresh" state has n == 0 (the zero initial
state): its step takes m' = i_raw and ties max(f n + i, 1) at 1. Cases:
``settled`` (n >= 1, the steady state), ``fresh`` (zero states), ``mixed``
(every third unit fresh, with nonzero c), ``tie`` (i_raw == lf exactly).
"""

import pytest

import mlx.core as mx

from conftest import assert_close, assert_step_results, flat_step_results
from mlx_fastrnn.cells.slstm import SLSTM_CELL, kernels, naive
from mlx_fastrnn.kernels import dialect, host_harness, launch
from mlx_fastrnn.ops.sequence import recurrence

_OK, _WHY = host_harness.available()
needs_compiler = pytest.mark.skipif(not _OK, reason=_WHY)
RUN_ON = [pytest.param("host:metal", marks=needs_compiler, id="host-metal"),
          pytest.param("host:cuda", marks=needs_compiler, id="host-cuda"),
          pytest.param("gpu", marks=pytest.mark.gpu, id="gpu")]
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
B, H = 6, 45  # 270 threads: CUDA launches 2 blocks of 256
ODD_SHAPES = [(1, 1), (1, 7), (3, 33)]
KINDS = ("settled", "fresh", "mixed", "tie")


def _rand(shape, seed, scale=1.0):
    return mx.random.normal(shape, key=mx.random.key(seed)) * scale


def make_case(batch, hidden, kind="settled", dtype=mx.float32, seed=0, scale=1.0):
    """Step operands: x (in ``dtype``), hp, states (y, c, n, m), d_out, d_rec."""
    lead = batch if isinstance(batch, tuple) else (batch,)
    x = _rand((*lead, 4 * hidden), seed, scale)
    hp = _rand((*lead, 4 * hidden), seed + 1)
    y, c, n, m = (_rand((*lead, hidden), seed + 2 + i) for i in range(4))
    n = 1 + mx.abs(n)
    if kind == "fresh":
        y, c, n, m = (mx.zeros_like(a) for a in (y, c, n, m))
    elif kind == "mixed":
        n = mx.where(mx.arange(hidden) % 3 == 0, 0.0, n)
    elif kind == "tie":
        # i_raw = m and f_raw = 200 (log_sigmoid = -0): i_raw == lf == m everywhere
        hp = mx.zeros_like(hp)
        gates = x.reshape(*lead, 4, hidden)
        x = mx.concatenate([m[..., None, :], mx.full(m[..., None, :].shape, 200.0),
                            gates[..., 2:, :]], axis=-2).reshape(*lead, 4 * hidden)
    d_out = tuple(_rand((*lead, hidden), seed + 10 + i) for i in range(4))
    d_rec = tuple(_rand((*lead, hidden), seed + 20 + i) for i in range(4))
    return dict(x=x.astype(dtype), hp=hp, states=(y, c, n, m), d_out=d_out, d_rec=d_rec)


# --------------------------------------------------------------------- the reference adjoint

def _autodiff_step(case):
    """The cotangents of (x, hp, y, c, n, m) by mx.vjp of naive.forward_step
    for the total cotangent d_out + d_rec."""
    def fwd(x, hp, *states):
        return naive.forward_step(x, hp, states, ())

    cot = [a + b for a, b in zip(case["d_out"], case["d_rec"])]
    _, grads = mx.vjp(fwd, [case["x"], case["hp"], *case["states"]], cot)
    return grads


@pytest.mark.parametrize("kind", KINDS)
def test_backward_step_is_the_adjoint(kind):
    case = make_case(B, H, kind, seed=1, scale=2.0)
    dx, dhp, direct = naive.backward_step(case["d_out"], case["d_rec"], case["x"], case["hp"],
                                          case["states"], ())
    gx, ghp, gy, gc, gn, gm = _autodiff_step(case)
    assert dx is dhp and direct[0] is None
    assert not mx.any(gy).item()  # y reaches the step only through hp
    assert_step_results([dx, dhp, *direct[1:]], [gx, ghp, gc, gn, gm], f"{kind} adjoint", rtol=1e-5, atol=2e-6)


def test_ties_split_the_cotangent_in_half():
    """FlashRNN's rule (torch.max/maximum's): at a tie each side gets half."""
    a, b = mx.array([1.0, 2.0, 3.0, float("nan")]), mx.array([1.0, 1.0, 4.0, 0.0])
    da, db = mx.grad(lambda a, b: naive.tie_maximum(a, b).sum(), argnums=(0, 1))(a, b)
    assert da.tolist()[:3] == [0.5, 1.0, 0.0] and db.tolist()[:3] == [0.5, 0.0, 1.0]
    assert mx.isnan(naive.tie_maximum(a, b)[3]).item()
    # the fresh step's n' = max(0 * f + exp(0), 1) is such a tie: half of dn' reaches u;
    # all of m''s cotangent goes to i_raw (m' = i_raw there)
    case = make_case(2, 3, "fresh", seed=2)
    k = naive._coefficients(case["x"], case["hp"], *case["states"][1:])
    assert mx.all(k.wu == 0.5).item() and mx.all(k.wi == 1.0).item()
    case = make_case(2, 3, "tie", seed=2)
    k = naive._coefficients(case["x"], case["hp"], *case["states"][1:])
    assert mx.all(k.wi == 0.5).item()


# --------------------------------------------------------------------- through the driver

def _loop_loss(xp, w_h, states0, cots):
    """A plain loop over naive.forward_step (autodiff's reference for the driver)."""
    states, outs = states0, [[] for _ in states0]
    for x_t in xp:
        states = naive.forward_step(x_t, states[0] @ w_h.T, states, ())
        for seq, a in zip(outs, states):
            seq.append(a)
    return sum((mx.stack(seq) * c).sum() for seq, c in zip(outs, cots))


@pytest.mark.parametrize("steps", ["compiled", "reference", "host:metal"])
@pytest.mark.parametrize("given", [True, False], ids=["states", "zero-states"])
def test_recurrence_gradients(steps, given):
    """ops.sequence.recurrence with the cell (CPU: backward_sequence; kernels:
    one backward step kernel per step) against autodiff of a plain loop."""
    if steps == "host:metal" and not _OK:
        pytest.skip(_WHY)
    L, batch, hidden = 5, 3, 7
    xp = _rand((L, batch, 4 * hidden), 30, 2.0)
    w_h = _rand((4 * hidden, hidden), 31, hidden ** -0.5)
    states0 = [_rand((batch, hidden), 32 + i) for i in range(4)]
    states0[2] = 1 + mx.abs(states0[2])
    if not given:
        states0 = [mx.zeros((batch, hidden)) for _ in range(4)]
    cots = [_rand((L, batch, hidden), 40 + i) for i in range(4)]
    impl = {"compiled": SLSTM_CELL.compiled_steps, "reference": SLSTM_CELL.reference_steps}.get(
        steps) or SLSTM_CELL.kernel_steps(steps)

    def ours(xp, w_h, *s):
        outs = recurrence(SLSTM_CELL, impl, xp, w_h, s, (), (given,) * 4)
        return sum((o * c).sum() for o, c in zip(outs, cots))

    argnums = tuple(range(6 if given else 2))
    got = mx.grad(ours, argnums=argnums)(xp, w_h, *states0)
    want = mx.grad(lambda xp, w_h, *s: _loop_loss(xp, w_h, s, cots), argnums=argnums)(
        xp, w_h, *states0)
    assert_step_results(list(got), list(want), f"recurrence {steps}", rtol=1e-5, atol=2e-6)


# --------------------------------------------------------------------- the step kernels

def forward(case, target=None):
    args = (case["x"], case["hp"], case["states"], ())
    if target is None:
        with mx.stream(mx.cpu):
            return naive.forward_step(*args)
    return kernels.forward_step(*args, target=_resolve(target))


def backward(case, target=None):
    args = (case["d_out"], case["d_rec"], case["x"], case["hp"], case["states"], ())
    if target is None:
        with mx.stream(mx.cpu):
            return naive.backward_step(*args)
    return kernels.backward_step(*args, target=_resolve(target))


def _resolve(target):
    if target == "gpu":
        real = launch.gpu_target()
        assert real is not None, "gpu test without a GPU default device"
        return real
    return target


def check(case, target, direction, what=""):
    fn = forward if direction == "forward" else backward
    got, ref = fn(case, target), fn(case)
    assert_step_results(got, ref, f"slstm {direction} {target} {what}")
    return got, ref


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("target", RUN_ON)
def test_kernels_match_naive(target, dtype, direction):
    got, _ = check(make_case(B, H, "mixed", DTYPES[dtype], seed=3), target, direction, dtype)
    assert all(g.dtype == mx.float32 for g in flat_step_results(got) if g is not None)  # f32 state for half x


@pytest.mark.parametrize("kind", ["settled", "fresh", "tie"])
@pytest.mark.parametrize("target", RUN_ON)
def test_kernels_state_kinds(target, kind):
    case = make_case(B, H, kind, seed=4)
    check(case, target, "forward", kind)
    check(case, target, "backward", kind)


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}")
@pytest.mark.parametrize("target", RUN_ON)
def test_odd_sizes(target, shape):
    case = make_case(*shape, "mixed", seed=7)
    check(case, target, "forward")
    check(case, target, "backward")


@pytest.mark.parametrize("target", RUN_ON)
def test_leading_axes_and_zero_states(target):
    """Extra leading axes fold into B; None (a zero state / no hp) acts as zeros."""
    case = make_case((2, 3), H, "mixed", seed=11)
    check(case, target, "forward")
    check(case, target, "backward")
    zero = dict(case, hp=None, states=(None,) * 4)
    zeros = dict(case, hp=mx.zeros_like(case["hp"]), states=tuple(mx.zeros_like(s) for s in case["states"]))
    assert_step_results(forward(zero, target), forward(zeros), f"zero-state {target}")
    assert_step_results(backward(zero, target), backward(zeros), f"zero-state backward {target}")


@pytest.mark.parametrize("target", RUN_ON)
def test_log_sigmoid_series(target):
    """The kernels' log-sigmoid (a series: the dialect has no log) against
    float64: i_raw = -1e30 makes m' = lf = log_sigmoid(f_raw) + 0 exactly."""
    tiny = mx.power(10.0, mx.linspace(-6, 2, 200))
    f_raw = mx.concatenate([mx.linspace(-30, 30, 3001), -tiny, tiny,
                            mx.array([-1e30, 1e30, -104.0, 89.0])])
    count = f_raw.size
    x = mx.concatenate([mx.full((count, 1), -1e30), f_raw[:, None], mx.zeros((count, 2))], axis=1)
    states = (None, None, mx.ones((count, 1)), mx.zeros((count, 1)))
    m = kernels.forward_step(x, None, states, (), target=_resolve(target))[3]
    v = f_raw.astype(mx.float64, stream=mx.cpu)
    with mx.stream(mx.cpu):
        # float64 exists on the CPU only: round it there
        exact = (mx.minimum(v, 0.0) - mx.log1p(mx.exp(-mx.abs(v)))).astype(mx.float32)
    assert_close(m[:, 0], exact, "log_sigmoid", rtol=1e-6, atol=1e-30)


# --------------------------------------------------------------------- extreme values

EXTREMES = [1e30, -1e30, 1e4, -1e4, 88.8, -88.8, 103.0, -104.0, 16.0, -16.0, 9.0, -9.0, 0.0]


@pytest.mark.parametrize("kind", ["settled", "fresh"])
@pytest.mark.parametrize("target", RUN_ON)
def test_extremes_do_not_overflow(target, kind):
    """|x| up to 1e30 in every gate (random rows at 1e4): the exponential
    gates stay finite (m' bounds them; a fresh f is capped), so the states do.
    (Not "mixed": a fresh unit with c != 0 has c' = e^(lf - i_raw) c, truly huge.)"""
    case = make_case(B, H, kind, seed=5, scale=1e4)
    rows = case["x"].reshape(B, 4, H)
    special = mx.broadcast_to(mx.array(EXTREMES + [0.0] * (H - len(EXTREMES))), (4, H))
    # row 0: the specials in every gate; row 1: each gate's specials against the others' reversed
    row1 = mx.stack([special[0], special[1, ::-1], special[2], special[3, ::-1]])
    case = dict(case, x=mx.concatenate([special[None], row1[None], rows[2:]]).reshape(B, 4 * H))
    ref = forward(case)
    for r in ref:
        assert mx.all(mx.isfinite(r)).item(), f"naive {kind}: not finite"
    got, _ = check(case, target, "forward", kind)
    for g in got:
        assert mx.all(mx.isfinite(g)).item(), f"kernel {kind}: not finite"
    got, ref = check(case, target, "backward", kind)
    for g in flat_step_results(got):
        if g is not None:
            assert not mx.any(mx.isnan(g)).item(), f"{kind} backward {target}: NaN"


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("target", RUN_ON)
def test_nan_propagates(target, direction):
    case = make_case(B, H, "mixed", seed=9)
    x = case["x"]
    x = mx.where((mx.arange(x.size).reshape(x.shape) % 37) == 0, float("nan"), x)
    y, c, n, m = case["states"]
    n = mx.where((mx.arange(n.size).reshape(n.shape) % 43) == 5, float("nan"), n)
    m = mx.where((mx.arange(m.size).reshape(m.shape) % 47) == 7, float("nan"), m)
    d_y = case["d_out"][0]
    d_y = mx.where((mx.arange(d_y.size).reshape(d_y.shape) % 41) == 3, float("nan"), d_y)
    case = dict(case, x=x, states=(y, c, n, m), d_out=(d_y, *case["d_out"][1:]))
    fn = forward if direction == "forward" else backward
    ref = flat_step_results(fn(case))
    assert all(mx.any(mx.isnan(r)).item() for r in ref if r is not None), "test setup"
    if direction == "forward":  # y' is NaN wherever a gate, n or m is
        bad = mx.isnan(x.reshape(B, 4, H)).any(axis=1) | mx.isnan(n) | mx.isnan(m)
        assert mx.array_equal(mx.isnan(ref[0]), bad).item()
    assert_step_results(fn(case, target), ref, f"{direction} {target} NaN")


@pytest.mark.parametrize("target", RUN_ON)
def test_grid_overlaunch_stays_in_bounds(target):
    """B*H = 257: CUDA launches 2 full blocks (512 threads); the harness checks
    guard bytes around every output (OutOfBoundsWrite otherwise)."""
    case = make_case(1, 257, "mixed", seed=13)
    check(case, target, "forward")
    check(case, target, "backward")


# --------------------------------------------------------------------- the sources

@pytest.mark.parametrize("ks", [kernels.FORWARD, kernels.BACKWARD], ids=lambda ks: ks.name)
def test_sources_follow_the_dialect(ks):
    for target in dialect.TARGETS:
        header, body = dialect.source(ks, target)
        assert "#if" not in ks.body and "#define" not in ks.body
        attrs = [a for a in host_harness._METAL_ATTRIBUTES if a in body]
        assert attrs == (["thread_position_in_grid"] if target == "metal" else [])
        for name in ks.input_names:
            for suffix in ("_shape", "_strides", "_ndim"):
                assert name + suffix not in body
        assert "inf" not in ks.body.replace("info", "")
        assert "gid >= dims[0] * H" in ks.body  # the bounds check
        assert "log" not in ks.body.replace("log_sigmoid", "").replace("log1p", "")  # no target math
    assert dialect.kernel_name(ks, "metal") != dialect.kernel_name(ks, "cuda")
    assert ks.template_names == ("T", "TS", "H")


def test_io_names():
    assert kernels.FORWARD.input_names == ("dims", "x", "hp", "c", "n", "m")
    assert kernels.FORWARD.output_names == ("y_out", "c_out", "n_out", "m_out")
    assert kernels.BACKWARD.input_names == ("dims", "dy_out", "dy_rec", "dc_out", "dc_rec", "dn_out",
                                            "dn_rec", "dm_out", "dm_rec", "x", "hp", "c", "n", "m")
    assert kernels.BACKWARD.output_names == ("dgates", "dc_prev", "dn_prev", "dm_prev")
    assert SLSTM_CELL.num_gates == 4 and SLSTM_CELL.num_states == 4
