"""flashrnn() (mlx_fastrnn/ops/flashrnn.py) against FlashRNN 1.0.8's vanilla backend.

- golden: tests/fixtures/flashrnn_golden.safetensors, the vanilla backend's
  float64 results and gradients for small cases covering every function and
  each sLSTM special case (written by tests/flashrnn_golden.py); runs anywhere.
- live: the vanilla backend itself (torch + flashrnn installed, skipped
  otherwise), in float64 on the same float32 tensors: every function, N in
  {1, 2, 4}, D up to 64 and odd sizes, T up to 64, states given or not.
- errors, dtypes and T = 0 need neither.

Tolerances (flashrnn computes in float32): results ``rtol 1e-5``, ``atol 1e-6 *
max(1, max|ref|)`` (the suite's assert_close); every gradient (Wx, R, b,
states; of a fixed random linear function of both results) ``rtol 1e-4``,
``atol 5e-6 * max(1, max|ref|)``: the gradients sum up to T*B products
(seen: at most 6e-7 of the scale).
"""

import pytest

import mlx.core as mx

import flashrnn_golden as golden
from conftest import assert_close
import mlx_fastrnn.ops.flashrnn as flashrnn_ops
from mlx_fastrnn.ops.flashrnn import FUNCTIONS, flashrnn

OUT_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=5e-6)
FUNCTION_NAMES = list(FUNCTIONS)


BACKENDS = ["fused", "vanilla"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def run_with_grads(arrays, function, backend="fused"):
    """flashrnn on ``arrays`` (mx: Wx, R, b, states or None, d_seq, d_last):
    ``{seq, last, dWx, dR, db[, dstates]}``, the gradients by mx.vjp."""
    names = ["Wx", "R", "b"] + (["states"] if arrays.get("states") is not None else [])

    def fn(*primals):
        given = dict(zip(names, primals))
        return flashrnn(given["Wx"], given["R"], given["b"], given.get("states"), function, backend)

    (seq, last), grads = mx.vjp(fn, [arrays[k] for k in names], [arrays["d_seq"], arrays["d_last"]])
    out = {"seq": seq, "last": last, **{"d" + k: g for k, g in zip(names, grads)}}
    mx.eval(out)
    return out


def assert_matches(got, ref, what):
    assert set(got) == set(ref), what
    for key, expected in ref.items():
        tol = OUT_TOL if key in ("seq", "last") else GRAD_TOL
        assert_close(got[key], expected, f"{what} {key}", check_dtype=False, **tol)


# --------------------------------------------------------------------- golden (no torch)

GOLDEN = golden.read_fixture()


@pytest.mark.parametrize("spec, arrays", GOLDEN, ids=["-".join(map(str, s)) for s, _ in GOLDEN])
def test_matches_golden_vanilla(spec, arrays, backend):
    ref = {k: arrays[k] for k in ("seq", "last", "dWx", "dR", "db", "dstates") if k in arrays}
    got = run_with_grads(arrays, spec[0], backend)
    for key in ("seq", "last"):
        assert got[key].dtype == mx.float32
    assert_matches(got, ref, str(spec))


def test_golden_covers_every_function_and_slstm_case():
    specs = [s for s, _ in GOLDEN]
    assert {s[0] for s in specs} == set(FUNCTIONS)
    assert {s[5] for s in specs if s[0] == "slstm"} == set(golden.STATE_KINDS)
    assert specs == [tuple(s) for s in golden.GOLDEN_CASES], "fixture stale: rerun tests/flashrnn_golden.py"


# --------------------------------------------------------------------- live vanilla backend

# (B, T, N, D): odd sizes, every head count, D up to 64, T up to 64
SHAPES = [(3, 7, 1, 5), (2, 16, 2, 8), (1, 64, 4, 16), (2, 33, 1, 64), (1, 1, 4, 3)]


@pytest.fixture(scope="module")
def vanilla():
    # ImportError too: an installed flashrnn may fail to import where its deps don't
    pytest.importorskip("numpy")
    pytest.importorskip("torch", exc_type=ImportError)
    pytest.importorskip("flashrnn", exc_type=ImportError)
    return golden.vanilla_reference


def _as_mx(case):
    return {k: (None if v is None else mx.array(v)) for k, v in case.items()}


def _ref_as_mx(ref):
    return {k: mx.array(v, dtype=mx.float64) if v.dtype.name == "float64" else mx.array(v)
            for k, v in ref.items()}


@pytest.mark.parametrize("states", ["none", "random"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}N{}D{}".format(*s))
@pytest.mark.parametrize("function", FUNCTION_NAMES)
def test_matches_vanilla_float64(vanilla, function, shape, states, backend):
    case = golden.make_case(function, *shape, states=states, seed=1)
    got = run_with_grads(_as_mx(case), function, backend)
    assert_matches(got, _ref_as_mx(vanilla(case, function)), f"{function} {shape} {states}")


@pytest.mark.parametrize("states", ["zeros", "partial", "tie", "fresh_low"])
def test_slstm_special_cases_match_vanilla(vanilla, states):
    """Fresh zero states (and the tie of max(f n + i, 1) they make), a batch
    only partly fresh (vanilla's whole-tensor test: not fresh), a tie of the
    stabilizer's max, and a fresh step whose forget gate vanilla overflows in
    float32 (finite in float64, so comparable)."""
    case = golden.make_case("slstm", 2, 6, 2, 5, states=states, seed=2)
    got = run_with_grads(_as_mx(case), "slstm")
    assert_matches(got, _ref_as_mx(vanilla(case, "slstm")), f"slstm {states}")


@pytest.mark.parametrize("function", FUNCTION_NAMES)
def test_matches_vanilla_float32(vanilla, function, backend):
    """The vanilla backend in float32 (its states in float32 too) on the same tensors."""
    case = golden.make_case(function, 2, 16, 2, 8, states="random", seed=3)
    got = run_with_grads(_as_mx(case), function, backend)
    assert_matches(got, _ref_as_mx(vanilla(case, function, dtype="float32")), function)


def test_vanilla_float32_overflows_where_we_stay_finite(vanilla):
    """The one deliberate difference: vanilla's fresh-step forget gate
    exp(lf - i_raw) overflows in float32 (inf * 0 = NaN in c); ours is capped."""
    case = golden.make_case("slstm", 2, 4, 2, 3, states="fresh_low", seed=4)
    ref = vanilla(case, "slstm", dtype="float32")
    assert mx.any(mx.isnan(mx.array(ref["seq"]))).item(), "vanilla no longer overflows: revisit the cap"
    seq, last = flashrnn(mx.array(case["Wx"]), mx.array(case["R"]), mx.array(case["b"]),
                         function="slstm")
    assert mx.all(mx.isfinite(seq)).item() and mx.all(mx.isfinite(last)).item()


# --------------------------------------------------------------------- dtypes, T = 0 (mlx only)

def _mx_case(function, batch, length, heads, dim, seed=0):
    gx, gr, gb, ns = golden.GATES[function]
    keys = mx.random.split(mx.random.key(seed), 4)
    return dict(Wx=mx.random.normal((batch, length, gx, heads, dim), key=keys[0]),
                R=mx.random.normal((gr, heads, dim, dim), key=keys[1]) / dim ** 0.5,
                b=mx.random.normal((gb, heads, dim), key=keys[2]),
                states=mx.abs(mx.random.normal((ns, batch, 1, heads, dim), key=keys[3])) + 1)


@pytest.mark.parametrize("tiled", [False, True], ids=["float32-operand", "half-operand"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("function", FUNCTION_NAMES)
def test_half_inputs_keep_float32_state(function, dtype, backend, tiled, monkeypatch):
    """Half inputs: the result has their dtype, computed in float32 throughout
    (exactly the float32 run, rounded once at the end) from the pre-activations
    ``Wx + b``, added in float32; rounded once to the input dtype only where the
    fused backend's heads run on the tiled kernels (``forward_class``, made to say
    so here: the kernels' half operand), never on the reference loop."""
    monkeypatch.setattr(flashrnn_ops, "forward_class", lambda *a: "tiled" if tiled else None)
    case = _mx_case(function, 2, 9, 2, 4)
    if function == "slstm":
        case["states"] = None  # given sLSTM states run the reference loop on every backend
    half = {k: None if case[k] is None else case[k].astype(dtype) for k in ("Wx", "R", "b", "states")}
    seq, last = flashrnn(half["Wx"], half["R"], half["b"], half["states"], function, backend)
    assert seq.dtype == dtype and last.dtype == dtype
    f32 = {k: None if a is None else a.astype(mx.float32) for k, a in half.items()}
    if backend == "fused" and tiled:  # the same pre-activations, as Wx with a zero bias where Wx's gates take b
        b_x = FUNCTIONS[function].b_x
        f32["Wx"] = (f32["Wx"] + f32["b"][b_x][None, None]).astype(dtype).astype(mx.float32)
        f32["b"] = mx.concatenate([f32["b"][:b_x.start], mx.zeros_like(f32["b"][b_x])])
    ref = flashrnn(f32["Wx"], f32["R"], f32["b"], f32["states"], function, backend)
    assert mx.array_equal(seq, ref[0].astype(dtype)).item()
    assert mx.array_equal(last, ref[1].astype(dtype)).item()
    grads = mx.grad(lambda wx: flashrnn(wx, half["R"], half["b"], half["states"], function, backend)[0]
                    .astype(mx.float32).sum())(half["Wx"])
    assert grads.dtype == dtype and mx.all(mx.isfinite(grads)).item()


def _case_with_cotangents(function, batch, length, heads, dim, states, seed):
    """``_mx_case`` (MLX only: CI has no numpy) with ``states`` "none" or "random" and
    random cotangents of both results."""
    case = _mx_case(function, batch, length, heads, dim, seed)
    if states == "none":
        case["states"] = None
    ns = golden.GATES[function][3]
    k_seq, k_last = mx.random.split(mx.random.key(seed + 100), 2)
    case["d_seq"] = mx.random.normal((ns, batch, length, heads, dim), key=k_seq)
    case["d_last"] = mx.random.normal((ns, batch, 1, heads, dim), key=k_last)
    return case


@pytest.mark.parametrize("states", ["none", "random"])
@pytest.mark.parametrize("function", FUNCTION_NAMES)
def test_jvp_agrees_with_the_vjp(function, states, backend):
    """Forward mode (mx.jvp) gives the directional derivative the reverse mode does:
    <d_out, J u> == <J^T d_out, u> for random tangents u of every input (the sLSTM's
    max(u, 1) has a constant operand, which has no tangent)."""
    case = _case_with_cotangents(function, 2, 5, 2, 3, states, seed=5)
    names = ["Wx", "R", "b"] + (["states"] if case["states"] is not None else [])
    primals = [case[k] for k in names]
    tangents = [mx.random.normal(p.shape, key=mx.random.key(20 + i)) for i, p in enumerate(primals)]
    cots = [case["d_seq"], case["d_last"]]

    def fn(*args):
        given = dict(zip(names, args))
        return flashrnn(given["Wx"], given["R"], given["b"], given.get("states"), function, backend)

    _, jus = mx.jvp(fn, primals, tangents)
    _, grads = mx.vjp(fn, primals, cots)
    forward_mode = sum((c * ju).sum() for c, ju in zip(cots, jus))
    reverse_mode = sum((g * u).sum() for g, u in zip(grads, tangents))
    scale = max(1.0, abs(reverse_mode.item()))
    assert abs(forward_mode.item() - reverse_mode.item()) <= 1e-4 * scale, (forward_mode, reverse_mode)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("function", FUNCTION_NAMES)
def test_nonfinite_r_propagates_from_the_first_step(function, bad, backend):
    """Without states, vanilla forms step 0's 0 @ R: NaN in the rows of a gate where R
    holds a NaN or an inf. The fused backend (which skips that product) gives the same
    NaNs and the same finite values, for each gate of R."""
    gr = golden.GATES[function][1]
    for gate in range(gr):
        case = _case_with_cotangents(function, 2, 3, 2, 4, "none", seed=6)
        r = mx.array(case["R"])
        r[gate, 1, 2, 3] = bad
        args = (case["Wx"], r, case["b"], None, function)
        got, ref = flashrnn(*args, backend)[0], flashrnn(*args, "vanilla")[0]
        assert mx.array_equal(mx.isnan(got), mx.isnan(ref)).item(), (gate, mx.isnan(got)[:, :, 0].tolist())
        assert mx.isnan(ref[:, :, 0]).any().item()  # the first step itself
        finite = mx.isfinite(ref)
        assert_close(mx.where(finite, got, 0), mx.where(finite, ref, 0), f"gate {gate}", **OUT_TOL)


@pytest.mark.parametrize("function", FUNCTION_NAMES)
def test_empty_sequence_returns_the_states(function):
    gx, gr, gb, ns = golden.GATES[function]
    states = mx.random.normal((ns, 2, 1, 3, 4), key=mx.random.key(0))
    seq, last = flashrnn(mx.zeros((2, 0, gx, 3, 4)), mx.zeros((gr, 3, 4, 4)), mx.zeros((gb, 3, 4)),
                         states, function)
    assert seq.shape == (ns, 2, 0, 3, 4)
    assert mx.array_equal(last, states).item()


# --------------------------------------------------------------------- errors

def _valid(function, B=2, T=3, N=2, D=4):
    gx, gr, gb, ns = golden.GATES[function]
    return dict(Wx=mx.zeros((B, T, gx, N, D)), R=mx.zeros((gr, N, D, D)), b=mx.zeros((gb, N, D)),
                states=mx.zeros((ns, B, 1, N, D)))


@pytest.mark.parametrize("function", FUNCTION_NAMES)
@pytest.mark.parametrize("name, bad, layout", [
    ("Wx", lambda a: a[0], "Wx must be [B, T, Gx="),
    ("Wx", lambda a: mx.concatenate([a, a], axis=2), "Wx must be [B, T, Gx="),
    ("R", lambda a: a.transpose(1, 0, 2, 3), "R must be [Gr="),
    ("R", lambda a: a[..., :-1], "R must be [Gr="),
    ("b", lambda a: a[None], "b must be [Gb="),
    ("states", lambda a: a[:, :, 0], "states must be [S="),
    ("states", lambda a: a[:, :1], "states must be [S="),
    ("states", lambda a: a.astype(mx.int32), "states must be floating point"),
], ids=["Wx-4d", "Wx-gates", "R-NG", "R-D", "b-5d", "states-noT", "states-B", "states-int"])
def test_bad_shapes_name_the_layout(function, name, bad, layout):
    args = _valid(function)
    args[name] = bad(args[name])
    with pytest.raises(ValueError, match=layout.replace("[", r"\[")):
        flashrnn(args["Wx"], args["R"], args["b"], args["states"], function)


def test_bad_function_and_types():
    args = _valid("lstm")
    with pytest.raises(ValueError, match="unknown function 'mlstm'.*'elman', 'gru', 'lstm', 'slstm'"):
        flashrnn(args["Wx"], args["R"], args["b"], function="mlstm")
    with pytest.raises(ValueError, match="Wx must be an mlx array"):
        flashrnn(args["Wx"].tolist(), args["R"], args["b"])
    # the GRU's bias has one gate more than its inputs (the candidate's recurrent bias)
    gru = _valid("gru")
    with pytest.raises(ValueError, match=r"b must be \[Gb=4"):
        flashrnn(gru["Wx"], gru["R"], gru["b"][:3], function="gru")


# --------------------------------------------------------------------- GPU

def _gpu_and_cpu(function, shape, seed, dtype, cpu_backend):
    """``run_with_grads`` of a random ``dtype`` case (no sLSTM states: given ones run the
    reference loop on every backend) with the fused backend on the GPU and with
    ``cpu_backend`` on the CPU: ``(got, want)``."""
    arrays = {k: None if a is None else a.astype(dtype) for k, a in _mx_case(function, *shape, seed=seed).items()}
    if function == "slstm":
        arrays["states"] = None
    keys = mx.random.split(mx.random.key(seed + 1), 2)
    seq_shape = (golden.GATES[function][3], shape[0], shape[1], shape[2], shape[3])
    arrays["d_seq"] = mx.random.normal(seq_shape, key=keys[0]).astype(dtype)
    arrays["d_last"] = mx.random.normal((*seq_shape[:2], 1, *seq_shape[3:]), key=keys[1]).astype(dtype)
    got = run_with_grads(arrays, function, "fused")
    prev = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        want = run_with_grads(arrays, function, cpu_backend)
    finally:
        mx.set_default_device(prev)
    return got, want


@pytest.mark.gpu
@pytest.mark.parametrize("function", FUNCTION_NAMES)
@pytest.mark.parametrize("shape", [(4, 33, 4, 16), (2, 20, 1, 64)], ids=lambda s: "B{}T{}N{}D{}".format(*s))
def test_gpu_fused_matches_cpu_vanilla(function, shape):
    """The fused backend on the GPU (persistent kernels on CUDA) against the
    reference loop on the CPU: outputs, last states and every gradient."""
    got, want = _gpu_and_cpu(function, shape, 5, mx.float32, "vanilla")
    assert_matches(got, want, f"gpu {function} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("function", FUNCTION_NAMES)
@pytest.mark.parametrize("shape", [(4, 33, 4, 16), (64, 12, 4, 128)], ids=lambda s: "B{}T{}N{}D{}".format(*s))
def test_gpu_fused_bfloat16_matches_cpu(function, shape):
    """bfloat16 inputs on the GPU (where the heads run on the tiled kernels their
    pre-activations rounded to bfloat16 as the kernels' operand, and bfloat16
    tensor-core plans where the planner picks them, which round h in the product)
    against the same call on the CPU (float32 pre-activations and products):
    outputs and every gradient to bfloat16's rounding over the sequence."""
    got, want = _gpu_and_cpu(function, shape, 7, mx.bfloat16, "fused")
    for key, expected in want.items():
        assert got[key].dtype == mx.bfloat16, key
        assert_close(got[key].astype(mx.float32), expected.astype(mx.float32), f"gpu bf16 {function} {key}",
                     rtol=5e-2, atol=2e-2)
