"""The fused step kernels, run on the CPU: the exact Metal and CUDA sources
compiled with the host C++ compiler (mlx_fastrnn.kernels.host_harness) and
compared with the reference steps in cells/<cell>/naive.py.

The kernels are called through the cells' own step functions
(``kernels.forward_step(..., target="host:metal")``), so the operand order,
shapes and template arguments the driver would launch with are tested too.
Half-precision ``x`` is compared with the reference fed the same half ``x``:
both compute in float32, so the float32 tolerances hold.

Every run checks that nothing is written outside the outputs and that every
output element is written; the CUDA emulation rounds the grid up to whole
blocks of 256 as MLX does, so the main shape (B*H = 270) over-launches.
Skipped when no C++ compiler can build the host preludes.
"""

import pytest

import mlx.core as mx

from conftest import assert_step_results, flat_step_results
from mlx_fastrnn.cells.gru import kernels as gru_kernels
from mlx_fastrnn.cells.gru import naive as gru_naive
from mlx_fastrnn.cells.lstm import kernels as lstm_kernels
from mlx_fastrnn.cells.lstm import naive as lstm_naive
from mlx_fastrnn.cells.rnn import kernels as rnn_kernels
from mlx_fastrnn.cells.rnn import naive as rnn_naive
from mlx_fastrnn.kernels import dialect, host_harness, launch

_OK, _WHY = host_harness.available()
needs_compiler = pytest.mark.skipif(not _OK, reason=_WHY)

TARGETS = ("metal", "cuda")
# Where the step kernels run: both sources on the host; on a machine with a
# GPU also the real launch path (mx.fast.metal_kernel / cuda_kernel).
RUN_ON = [pytest.param("host:metal", marks=needs_compiler, id="host-metal"),
          pytest.param("host:cuda", marks=needs_compiler, id="host-cuda"),
          pytest.param("gpu", marks=pytest.mark.gpu, id="gpu")]
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
B, H = 6, 45  # 270 threads: CUDA launches 2 blocks of 256
ODD_SHAPES = [(1, 1), (1, 7), (3, 33)]

# cell -> (kernels module, naive module, gates, states, has bhn, step kwargs)
CELLS = {
    "gru": (gru_kernels, gru_naive, 3, 1, True, {}),
    "lstm": (lstm_kernels, lstm_naive, 4, 2, False, {}),
    "rnn_tanh": (rnn_kernels, rnn_naive, 1, 1, False, {"relu": False}),
    "rnn_relu": (rnn_kernels, rnn_naive, 1, 1, False, {"relu": True}),
}


def _rand(shape, seed, scale=1.0):
    return mx.random.normal(shape, key=mx.random.key(seed)) * scale


def make_case(cell, batch, hidden, dtype=mx.float32, seed=0, scale=1.0):
    """Random step operands: x (in ``dtype``), hp, states, params, d_out, d_rec."""
    _, _, gates, n_states, has_bhn, _ = CELLS[cell]
    lead = batch if isinstance(batch, tuple) else (batch,)
    x = _rand((*lead, gates * hidden), seed, scale).astype(dtype)
    hp = _rand((*lead, gates * hidden), seed + 1)
    states = tuple(_rand((*lead, hidden), seed + 2 + i) for i in range(n_states))
    params = (_rand((hidden,), seed + 5),) if has_bhn else ()
    d_out = tuple(_rand((*lead, hidden), seed + 10 + i) for i in range(n_states))
    d_rec = tuple(_rand((*lead, hidden), seed + 20 + i) for i in range(n_states))
    return dict(x=x, hp=hp, states=states, params=params, d_out=d_out, d_rec=d_rec)


def forward(cell, case, target=None):
    """The forward step: the reference (target None) or the kernel on the host."""
    kmod, nmod, *_, kw = CELLS[cell]
    args = (case["x"], case["hp"], case["states"], case["params"])
    if target is None:  # the reference, always on the CPU
        with mx.stream(mx.cpu):
            return nmod.forward_step(*args, **kw)
    return kmod.forward_step(*args, **kw, target=_resolve(target))


def backward(cell, case, target=None):
    kmod, nmod, *_, kw = CELLS[cell]
    args = (case["d_out"], case["d_rec"], case["x"], case["hp"], case["states"], case["params"])
    if target is None:
        with mx.stream(mx.cpu):
            return nmod.backward_step(*args, **kw)
    return kmod.backward_step(*args, **kw, target=_resolve(target))


def _resolve(target):
    if target == "gpu":
        real = launch.gpu_target()
        assert real is not None, "gpu test without a GPU default device"
        return real
    return target


def check(cell, case, target, direction):
    fn = forward if direction == "forward" else backward
    assert_step_results(fn(cell, case, target), fn(cell, case), f"{cell} {direction} {target}")


# --------------------------------------------------------------------- against naive

@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("target", RUN_ON)
@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_naive(cell, target, dtype, direction):
    check(cell, make_case(cell, B, H, DTYPES[dtype], seed=3), target, direction)


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}")
@pytest.mark.parametrize("target", RUN_ON)
@pytest.mark.parametrize("cell", list(CELLS))
def test_odd_sizes(cell, target, shape):
    case = make_case(cell, *shape, seed=7)
    check(cell, case, target, "forward")
    check(cell, case, target, "backward")


@pytest.mark.parametrize("target", RUN_ON)
@pytest.mark.parametrize("cell", list(CELLS))
def test_leading_axes_and_zero_states(cell, target):
    """Extra leading axes fold into B; None (a zero state / no hp) acts as zeros."""
    case = make_case(cell, (2, 3), H, seed=11)
    check(cell, case, target, "forward")
    check(cell, case, target, "backward")
    zero = dict(case, hp=None, states=tuple(None for _ in case["states"]))
    zeros = dict(case, hp=mx.zeros_like(case["hp"]),
                 states=tuple(mx.zeros_like(s) for s in case["states"]))
    assert_step_results(forward(cell, zero, target), forward(cell, zeros), f"{cell} zero-state {target}")


# --------------------------------------------------------------------- extreme values

EXTREMES = [1e30, -1e30, 1e4, -1e4, 88.8, -88.8, 103.0, -104.0, 16.0, -16.0, 9.0, -9.0,
            float("inf"), -float("inf")]


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("target", RUN_ON)
@pytest.mark.parametrize("cell", list(CELLS))
def test_extreme_values(cell, target, direction):
    """|x| up to 1e30 and +-inf (where naive is finite) give no NaN; large
    random pre-activations saturate the same way."""
    case = make_case(cell, B, H, seed=5, scale=1e4)
    # every gate block of row 0 gets the specials
    x = case["x"]
    gates = CELLS[cell][2]
    rows = x.reshape(B, gates, H)
    special = mx.broadcast_to(mx.array(EXTREMES + [0.0] * (H - len(EXTREMES))), (gates, H))
    x = mx.concatenate([special[None], rows[1:]]).reshape(B, gates * H)
    case = dict(case, x=x)
    fn = forward if direction == "forward" else backward
    ref = flat_step_results(fn(cell, case))
    for r in ref:
        if r is not None:
            assert not mx.any(mx.isnan(r)).item(), "test setup: naive gave NaN"
    got = flat_step_results(fn(cell, case, target))
    for g in got:
        if g is not None:
            assert not mx.any(mx.isnan(g)).item(), f"{cell} {direction} {target}: NaN"
    assert_step_results(got, ref, f"{cell} {direction} {target} extremes")


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("target", RUN_ON)
@pytest.mark.parametrize("cell", list(CELLS))
def test_nan_propagates(cell, target, direction):
    case = make_case(cell, B, H, seed=9)
    x = case["x"]
    nan_at = (mx.arange(x.size).reshape(x.shape) % 37) == 0
    d_h = case["d_out"][0]
    d_h = mx.where((mx.arange(d_h.size).reshape(d_h.shape) % 41) == 3, float("nan"), d_h)
    case = dict(case, x=mx.where(nan_at, float("nan"), x), d_out=(d_h, *case["d_out"][1:]))
    fn = forward if direction == "forward" else backward
    ref = flat_step_results(fn(cell, case))
    assert any(r is not None and mx.any(mx.isnan(r)).item() for r in ref), "test setup"
    assert_step_results(fn(cell, case, target), ref, f"{cell} {direction} {target} NaN")


# --------------------------------------------------------------------- grid and bounds

@pytest.mark.parametrize("target", RUN_ON)
@pytest.mark.parametrize("cell", list(CELLS))
def test_grid_overlaunch_stays_in_bounds(cell, target):
    """B*H = 257: CUDA launches 2 full blocks (512 threads); the harness
    checks guard bytes around every output (OutOfBoundsWrite otherwise)."""
    case = make_case(cell, 1, 257, seed=13)
    check(cell, case, target, "forward")
    check(cell, case, target, "backward")


_NO_BOUNDS_CHECK = dialect.KernelSource(
    name="test_no_bounds_check",
    input_names=("dims", "x"),
    output_names=("y",),
    body="y[gid] = static_cast<float>(x[gid]) + static_cast<float>(dims[0]) * 0.0f;\n",
)


@needs_compiler
def test_harness_catches_missing_bounds_check():
    x = mx.arange(300, dtype=mx.float32)
    args = ([mx.array([300, 0, 0, 0], dtype=mx.int32), x], [(300,)], [("T", mx.float32), ("H", 1)])
    # Metal dispatches exactly 300 threads: fine.
    (y,) = host_harness.run(_NO_BOUNDS_CHECK, "metal", *args)
    assert mx.array_equal(y, x).item()
    # CUDA rounds up to 512 threads: the missing check writes past the end.
    with pytest.raises(host_harness.OutOfBoundsWrite):
        host_harness.run(_NO_BOUNDS_CHECK, "cuda", *args)


@needs_compiler
def test_harness_catches_unwritten_output():
    ks = dialect.KernelSource(
        name="test_half_written", input_names=("dims", "x"), output_names=("y",),
        body="if (gid < dims[0] * H && gid % 2 == 0) { y[gid] = static_cast<float>(x[gid]); }\n")
    with pytest.raises(host_harness.UnwrittenOutput):
        host_harness.run(ks, "cuda", [mx.array([8, 0, 0, 0], dtype=mx.int32), mx.ones(8)],
                         [(8,)], [("T", mx.float32), ("H", 1)])


@needs_compiler
def test_harness_half_storage_types_need_static_cast():
    """The host half/bfloat16 types convert to float only explicitly, so a body
    doing arithmetic on T directly (ill-formed or ambiguous on some targets)
    fails here too."""
    ks = dialect.KernelSource(
        name="test_implicit_half", input_names=("dims", "x"), output_names=("y",),
        body="if (gid < dims[0] * H) { y[gid] = x[gid] + 1.0f; }\n")
    for target in TARGETS:
        with pytest.raises(host_harness.HostCompileError):
            host_harness.run(ks, target, [mx.array([4, 0, 0, 0], dtype=mx.int32),
                                          mx.ones(4, mx.bfloat16)],
                             [(4,)], [("T", mx.bfloat16), ("H", 1)])


# --------------------------------------------------------------------- the sources

ALL_SOURCES = [gru_kernels.FORWARD, gru_kernels.BACKWARD, lstm_kernels.FORWARD,
               lstm_kernels.BACKWARD, rnn_kernels.FORWARD, rnn_kernels.BACKWARD]


@pytest.mark.parametrize("ks", ALL_SOURCES, ids=lambda ks: ks.name)
def test_sources_follow_the_dialect(ks):
    for target in TARGETS:
        header, body = dialect.source(ks, target)
        assert "#if" not in ks.body and "#define" not in ks.body
        # MLX's Metal generator adds a parameter per attribute named in the body:
        # only thread_position_in_grid (from the prelude) may appear.
        attrs = [a for a in host_harness._METAL_ATTRIBUTES if a in body]
        assert attrs == (["thread_position_in_grid"] if target == "metal" else [])
        assert "thread_position_in_grid" not in header
        for name in ks.input_names:
            for suffix in ("_shape", "_strides", "_ndim"):
                assert name + suffix not in body
        assert "inf" not in ks.body.replace("info", "")
        assert "gid >= dims[0] * H" in ks.body  # the bounds check
    assert dialect.kernel_name(ks, "metal") != dialect.kernel_name(ks, "cuda")


def test_design_io_table():
    """Names and order exactly as docs/DESIGN.md's kernel I/O table."""
    table = {
        gru_kernels.FORWARD: (("dims", "x", "hp", "h", "bhn"), ("h_out",)),
        gru_kernels.BACKWARD: (("dims", "dh_out", "dh_rec", "x", "hp", "h", "bhn"),
                               ("dx", "dhp", "dh_direct")),
        lstm_kernels.FORWARD: (("dims", "x", "hp", "c"), ("h_out", "c_out")),
        lstm_kernels.BACKWARD: (("dims", "dh_out", "dh_rec", "dc_out", "dc_rec", "x", "hp", "c"),
                                ("dgates", "dc_prev")),
        rnn_kernels.FORWARD: (("dims", "x", "hp"), ("h_out",)),
        rnn_kernels.BACKWARD: (("dims", "dh_out", "dh_rec", "x", "hp"), ("dpre",)),
    }
    for ks, (ins, outs) in table.items():
        assert ks.input_names == ins and ks.output_names == outs, ks.name
    names = {dialect.kernel_name(ks, t) for ks in ALL_SOURCES for t in TARGETS}
    assert len(names) == 2 * len(ALL_SOURCES)


def test_cpu_build_targets_and_lazy_kernels():
    """No GPU target on a CPU device; kernel objects are only made on use
    (cuda_kernel creation raises on a build without CUDA) and failures are
    not cached."""
    with mx.stream(mx.cpu):
        assert launch.gpu_target() is None
    if not mx.cuda.is_available():
        launch.fused_kernel.cache_clear()
        with pytest.raises(RuntimeError):
            launch.fused_kernel(rnn_kernels.FORWARD, "cuda")
        assert launch.fused_kernel.cache_info().currsize == 0
    with pytest.raises(ValueError):
        launch.launch(rnn_kernels.FORWARD, "opencl", [], [(1, 1)], [])
