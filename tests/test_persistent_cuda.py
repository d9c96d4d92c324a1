"""The persistent (whole-sequence) CUDA kernels on a real GPU.

Parity with the cells' reference steps (computed on the CPU stream, so no
TF32 or other GPU matmul shortcuts leak into the oracle), fallback selection,
co-residency, repeatability, and a deadlock guard that runs the kernels in a
subprocess with a timeout. Skipped unless MLX's CUDA backend is available.
"""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest

import mlx.core as mx

import persistent_reference as ref
from mlx_fastrnn.kernels import persistent as P
from mlx_fastrnn.kernels.gpu import mlx_cuda_graphs


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ref.cuda_available(), reason="needs MLX's CUDA backend"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("MLX_FASTRNN_PERSISTENT", "MLX_FASTRNN_PERSISTENT_SMEM", "MLX_FASTRNN_PERSISTENT_BLOCKS",
              "MLX_FASTRNN_PERSISTENT_SWITCHES", "MLX_FASTRNN_PERSISTENT_CLUSTER", "MLX_FASTRNN_PERSISTENT_MMA_FIT",
              "MLX_FASTRNN_PERSISTENT_PIPELINE"):
        monkeypatch.delenv(k, raising=False)
    # The FMA projection, compared at float32 rounding; the tensor-core plans (whose
    # operands are rounded to bfloat16 / float16 / tf32): test_mma_cuda.py.
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_MMA", "0")


def _check_sequence(cell, L, B, H, xdt, h0_zero, weights="auto", need=None):
    xp, w_h, s0, params = ref.problem(cell, L, B, H, xdt)
    if h0_zero:
        s0 = tuple(mx.zeros_like(s) for s in s0)
    mx.eval(xp, w_h, s0, params)
    got = P.persistent_sequence(cell, xp, w_h, s0, params, h0_zero, weights=weights)
    assert got is not None, "the persistent path declined a shape it should take"
    mx.eval(got)
    p = P.select("forward", cell, xp, w_h, weights=weights)
    w_ref = w_h.astype(p.w_dtype).astype(mx.float32)  # the W_h the kernel reads (16-bit where it holds that)
    expected = ref.on_cpu(ref.forward, cell, xp, w_ref, s0, params, h0_zero)
    assert len(got) == len(expected)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert a.dtype == mx.float32 and a.shape == e.shape
        err = ref.max_rel_err(a, e)
        assert err < ref.gpu_tol(L), f"forward output {i}: rel err {err:.2e} ({p})"

    need = (not h0_zero) if need is None else need
    seqs, hp = expected[:-1], expected[-1]
    prevs = ref.prevs_of(s0, seqs)
    d_outs = ref.cotangents(cell, L, B, H)
    mx.eval(prevs, d_outs)
    bw = P.persistent_backward(cell, d_outs, xp, hp, prevs, params, w_h, need, weights=weights)
    assert bw is not None
    dx, dhp, d0 = bw
    mx.eval(dx, dhp, d0)
    rdx, rdhp, rd0 = ref.on_cpu(ref.backward, cell, d_outs, xp, hp, prevs, params, w_ref, need)
    pb = P.select("backward", cell, xp, w_h, weights=weights)
    assert ref.max_rel_err(dx, rdx) < ref.gpu_tol(L), pb
    assert ref.max_rel_err(dhp, rdhp) < ref.gpu_tol(L), pb
    if need:
        assert len(d0) == len(rd0)
        for a, e in zip(d0, rd0):
            assert ref.max_rel_err(a, e) < ref.gpu_tol(L), pb
    else:
        assert d0 is None


SHAPES = [  # (L, B, H)
    (1, 1, 1),
    (1, 4, 33),
    (3, 1, 33),
    (7, 5, 200),
    (5, 3, 1),
    (12, 33, 64),
    (40, 32, 200),
]


@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("xdt", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("L,B,H", SHAPES)
def test_parity(cell, xdt, L, B, H):
    _check_sequence(cell, L, B, H, xdt, h0_zero=False)


@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("L,B,H", [(1, 2, 33), (6, 3, 200)])
def test_parity_zero_initial_state(cell, L, B, H):
    _check_sequence(cell, L, B, H, mx.float32, h0_zero=True)
    _check_sequence(cell, L, B, H, mx.float32, h0_zero=True, need=True)


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn_tanh"])
def test_parity_long_sequence(cell):
    _check_sequence(cell, 1024, 2, 33, mx.float32, h0_zero=False)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("L,B,H", [(8, 64, 256), (4, 16, 512)])
def test_parity_benchmark_like_shapes(cell, L, B, H):
    _check_sequence(cell, L, B, H, mx.float32, h0_zero=False)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_parity_bf16_weight_slices(cell):
    _check_sequence(cell, 9, 6, 96, mx.bfloat16, h0_zero=False, weights="half")


@pytest.mark.parametrize("cell,H", [("lstm", 1024), ("gru", 1536), ("rnn_tanh", 2048)])
def test_parity_streamed_weights(cell, H):
    """W_h streamed from global memory every step (``weights="global"``): shapes no
    shared-memory slice holds (the layers use it where ``tiled_select.STREAMED_MAX_CYCLES``
    says it pays)."""
    _check_sequence(cell, 6, 4, H, mx.float32, h0_zero=False, weights="global")


def test_streamed_weights_by_default_where_measured_faster(monkeypatch):
    """A W_h no slice holds streams by default where the plan's cost is within the
    measured bound (LSTM H=1024, 2 rows), never with MLX_FASTRNN_PERSISTENT_STREAMED=0
    (parity: ``test_parity_streamed_weights``)."""
    xp, w_h, s0, params = ref.problem("lstm", 3, 2, 1024)
    monkeypatch.delenv("MLX_FASTRNN_PERSISTENT_STREAMED", raising=False)
    p = P.select("forward", "lstm", xp, w_h)
    assert p is not None and p.w_global
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_STREAMED", "0")
    assert P.select("forward", "lstm", xp, w_h) is None


def test_parity_float16_input():
    _check_sequence("lstm", 5, 3, 40, mx.float16, h0_zero=False)


VARLEN_CASES = [  # (cell, L, B, H, x dtype, zero initial state, lengths, REV mask, problems)
    ("lstm", 40, 32, 200, mx.float32, False, "seeded", 1, 1),
    ("gru", 33, 5, 200, mx.bfloat16, True, "seeded", 0b10, 2),
    ("rnn_tanh", 12, 3, 64, mx.float32, False, None, 1, 1),
    ("slstm", 20, 4, 40, mx.float32, False, "seeded", 0b10, 2),
    ("lstm", 16, 1, 256, mx.float32, True, None, 0b10, 2),
]


def seeded_lengths(rows, L, seed=0):
    """Lengths in [1, L] with one row at L and one at 1 (where there are two rows)."""
    lens = mx.random.randint(1, L + 1, (rows,), key=mx.random.key(seed)).tolist()
    lens[0] = L
    if rows > 1:
        lens[-1] = 1
    return lens


@pytest.mark.parametrize("interleaved", [False, True], ids=["problem_major", "interleaved"])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{c[0]}-L{c[1]}-B{c[2]}-H{c[3]}-rev{c[7]}-np{c[8]}")
def test_varlen_parity(case, interleaved):
    """Lengths and directions inside the tiled kernels on the GPU against the
    masked reference (CPU stream) and its vjp; x, out, dx and the out
    cotangent problem-major or problem-interleaved (``XIL``)."""
    cell, L, B, H, xdt, zero, lens, rev, problems = case
    if interleaved and problems == 1:
        pytest.skip("one problem: the two layouts are the same")
    lens = seeded_lengths(B * problems, L) if lens == "seeded" else None

    def forward(*args, lens, rev, **kw):
        p = P.select("forward", cell, args[0], args[1])
        assert p is not None
        out = P.persistent_sequence(cell, *args, use_plan=p, lens=lens, rev=rev, **kw)
        assert out is not None
        mx.eval(out)
        return out

    def backward(*args, lens, rev, d_out, **kw):
        out = P.persistent_backward(cell, *args, lens=lens, rev=rev, d_out=d_out, **kw)
        assert out is not None
        mx.eval(out)
        return out

    ref.check_varlen(cell, L, B, H, xdt, zero, lens, rev, problems, forward, backward, on=ref.on_cpu,
                     tol=(ref.gpu_tol(L), 5 * ref.gpu_tol(L)), interleaved=interleaved)


# (cell, L, B, H): shapes whose forward and backward plans are clusters on the H200
CLUSTER_SHAPES = [("gru", 9, 8, 128), ("lstm", 7, 32, 128), ("rnn_tanh", 6, 64, 256), ("rnn_relu", 5, 16, 32),
                  ("slstm", 4, 16, 32), ("gru", 300, 8, 96)]

def _cluster_plan_or_skip(direction, cell, xp, w_h):
    """The selected plan, which on the H200 (the shapes' reference GPU) must be a cluster
    plan; on another GPU a grid plan skips the test."""
    p = P.select(direction, cell, xp, w_h)
    assert p is not None
    if not p.CL:
        assert not _on_h200(), (direction, p)
        pytest.skip("no cluster plan for this shape on this GPU")
    return p


def _on_h200():
    """Whether the GPU is H200 / H100-like (132 SMs, compute capability 9): the cluster
    tests' shapes are cluster plans there."""
    lim = P.device_limits()
    return (lim.num_sms, lim.cc_major) == (132, 9)


# Cluster plans run only where MLX records no CUDA graphs (tiled_plan.clusters_enabled),
# which MLX decides once per process: these tests run in a subprocess with
# MLX_USE_CUDA_GRAPHS=0 (test_cluster_plans_without_cuda_graphs) and skip elsewhere.
needs_no_graphs = pytest.mark.skipif(mlx_cuda_graphs(), reason="cluster plans need MLX_USE_CUDA_GRAPHS=0 "
                                     "(run by test_cluster_plans_without_cuda_graphs)")


@needs_no_graphs
@pytest.mark.parametrize("xdt", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cell,L,B,H", CLUSTER_SHAPES)
def test_parity_cluster_plans(cell, L, B, H, xdt):
    """Batch groups as thread-block clusters (the cluster barrier instead of the grid
    barrier) against the reference, forward and backward, and bitwise repeatable (a
    barrier that let a block read a stale h would differ between runs)."""
    if P.device_limits().cc_major < 9:
        pytest.skip("thread-block clusters need compute capability 9")
    xp, w_h, s0, params = ref.problem(cell, L, B, H, xdt)
    for direction in ("forward", "backward"):
        _cluster_plan_or_skip(direction, cell, xp, w_h)
    _check_sequence(cell, L, B, H, xdt, h0_zero=False)
    a = P.persistent_sequence(cell, xp, w_h, s0, params, False)
    b = P.persistent_sequence(cell, xp, w_h, s0, params, False)
    mx.eval(a, b)
    assert all(mx.array_equal(x, y).item() for x, y in zip(a, b))


@needs_no_graphs
def test_varlen_parity_cluster_plans():
    """Two problems (one reversed) with per-row lengths in one cluster launch."""
    if P.device_limits().cc_major < 9:
        pytest.skip("thread-block clusters need compute capability 9")
    cell, L, B, H = "gru", 37, 8, 128

    def forward(*args, lens, rev, **kw):
        p = _cluster_plan_or_skip("forward", cell, args[0], args[1])
        out = P.persistent_sequence(cell, *args, use_plan=p, lens=lens, rev=rev, **kw)
        mx.eval(out)
        return out

    def backward(*args, lens, rev, d_out, **kw):
        p = _cluster_plan_or_skip("backward", cell, args[1], args[5])
        out = P.persistent_backward(cell, *args, use_plan=p, lens=lens, rev=rev, d_out=d_out, **kw)
        mx.eval(out)
        return out

    ref.check_varlen(cell, L, B, H, mx.float32, False, seeded_lengths(2 * B, L), 0b10, 2, forward, backward,
                     on=ref.on_cpu, tol=(ref.gpu_tol(L), 5 * ref.gpu_tol(L)))


@needs_no_graphs
@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("H,B,blocks,weights,xdt", [(9, 4, 3, "auto", mx.float32), (128, 8, 8, "auto", mx.float32),
                                                    (40, 9, 5, "mma", mx.bfloat16)],
                         ids=["3-blocks", "8-blocks", "5-blocks-tensor-cores"])
def test_cluster_barrier_equals_grid_barrier(cell, H, B, blocks, weights, xdt, monkeypatch):
    """The same split (one batch group of ``blocks`` blocks) with the grid barrier and as a
    cluster (CL = NU: 3, 5 and 8 blocks; FMA and tensor-core projections): bitwise equal
    results forward and backward, so the cluster barrier orders what the grid barrier does."""
    if P.device_limits().cc_major < 9:
        pytest.skip("thread-block clusters need compute capability 9")
    if weights == "mma":
        monkeypatch.delenv("MLX_FASTRNN_PERSISTENT_MMA")  # the fixture's FMA pin
    L = 7
    xp, w_h, s0, params = ref.problem(cell, L, B, H, xdt)
    lim = P.Limits(**{**P.device_limits().__dict__, "num_sms": blocks})
    runs = []
    for cluster in (False, True):
        pf = P.plan("forward", cell, H, B, lim, x_dtype=xdt, nbb=1, weights=weights, cluster=False)
        pb = P.plan("backward", cell, H, B, lim, x_dtype=xdt, nbb=1, weights=weights, cluster=False)
        assert pf.NU == pb.NU == blocks and pf.NBB == pb.NBB == 1 and (weights == "auto") == (pf.mma == 0)
        if cluster:
            pf, pb = dataclasses.replace(pf, CL=pf.NU), dataclasses.replace(pb, CL=pb.NU)
        out = P.persistent_sequence(cell, xp, w_h, s0, params, False, use_plan=pf)
        seqs, hp = out[:-1], out[-1]
        prevs = ref.prevs_of(s0, seqs)
        back = P.persistent_backward(cell, ref.cotangents(cell, L, B, H), xp, hp, prevs, params, w_h, True,
                                     use_plan=pb)
        mx.eval(out, back)
        runs.append([*out, back[0], back[1], *back[2]])
    for a, b in zip(*runs):
        assert mx.array_equal(a, b).item()


@needs_no_graphs
@pytest.mark.parametrize("kind,B,L,H", [("LSTM", 8, 20, 96), ("GRU", 8, 20, 128), ("RNN", 32, 10, 200)])
def test_layer_cluster_plans(kind, B, L, H):
    """The drop-in layer where its forward runs a cluster plan: output and every
    gradient against stock mlx.nn (float32)."""
    if P.device_limits().cc_major < 9:
        pytest.skip("thread-block clusters need compute capability 9")
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    import mlx_fastrnn
    from mlx_fastrnn.kernels import classes

    cell, G = {"LSTM": ("lstm", 4), "GRU": ("gru", 3), "RNN": ("rnn_tanh", 1)}[kind]
    klass, p = classes.choose("forward", cell, classes.Operand((L, B, G * H), mx.float32, 3),
                              classes.Operand((G * H, H), mx.float32, 2))
    if not (klass == "tiled" and p.CL > 0):
        assert not _on_h200(), (klass, p)
        pytest.skip("no cluster plan for this layer on this GPU")
    fast = getattr(mlx_fastrnn, kind)(H, H)
    stock = getattr(nn, kind)(H, H)
    stock.update(fast.parameters())
    x = mx.random.normal((B, L, H), key=mx.random.key(3))

    def loss(model, x):
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        return (out * mx.cos(mx.arange(out.size).reshape(out.shape) * 0.1)).sum()

    got = nn.value_and_grad(fast, loss)(fast, x)
    want = nn.value_and_grad(stock, loss)(stock, x)
    mx.eval(got, want)
    assert ref.max_rel_err(got[0], want[0]) < 1e-4
    for (name, g), (_, w) in zip(tree_flatten(got[1]), tree_flatten(want[1])):
        assert ref.max_rel_err(g, w) < 1e-4, name


def test_cluster_plans_without_cuda_graphs():
    """The cluster tests above in a process where MLX records no CUDA graphs; where it
    does (this process, by default) no plan is a cluster."""
    if P.device_limits().cc_major < 9:
        pytest.skip("thread-block clusters need compute capability 9")
    if mlx_cuda_graphs():
        xp, w_h, _, _ = ref.problem("gru", 9, 8, 128)
        assert P.select("forward", "gru", xp, w_h).CL == 0
    env = {**os.environ, "MLX_USE_CUDA_GRAPHS": "0"}
    env.pop("MLX_FASTRNN_PERSISTENT_CLUSTER", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           os.path.join(ROOT, "tests", "test_persistent_cuda.py"), "-k", "cluster and not without"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env, cwd=ROOT)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0 and "passed" in summary and ("skipped" not in summary or not _on_h200()), \
        res.stdout[-4000:] + res.stderr[-2000:]


def test_repeatable():
    """Bitwise equal across runs: a race in the barrier would show up here."""
    xp, w_h, s0, params = ref.problem("gru", 64, 16, 256)
    a = P.persistent_sequence("gru", xp, w_h, s0, params, False)
    b = P.persistent_sequence("gru", xp, w_h, s0, params, False)
    mx.eval(a, b)
    for x, y in zip(a, b):
        assert mx.array_equal(x, y).item()


def test_device_limits_and_grid():
    limits = P.device_limits()
    assert limits is not None and limits.num_sms >= 1 and limits.smem_per_block >= 48 * 1024
    for cell in ref.CELL_NAMES:
        for B, H in [(1, 1), (32, 200), (64, 256), (16, 512), (256, 128)]:
            for d in ("forward", "backward"):
                p = P.plan(d, cell, H, B, limits)
                if p is not None:
                    assert p.nblocks <= limits.num_sms
                    assert p.smem <= limits.smem_per_block


def test_selector_falls_back(monkeypatch):
    xp, w_h, s0, params = ref.problem("lstm", 3, 2, 64)
    tiny = P.Limits(num_sms=1, smem_per_block=1024, smem_per_sm=4096)
    assert P.persistent_sequence("lstm", xp, w_h, s0, params, False, limits=tiny) is None
    # W_h slice too large for shared memory (LSTM H=2048 on 132 SMs: 512 KiB per block):
    # streamed by default, the per-step cells without streaming
    big_x = mx.zeros((2, 1, 4 * 2048))
    big_w = mx.zeros((4 * 2048, 2048))
    states = (mx.zeros((1, 2048)), mx.zeros((1, 2048)))
    assert P.select("forward", "lstm", big_x, big_w).w_global
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_STREAMED", "0")
    assert P.persistent_sequence("lstm", big_x, big_w, states, (), False) is None
    monkeypatch.delenv("MLX_FASTRNN_PERSISTENT_STREAMED")
    # wrong state shapes / params
    assert P.persistent_sequence("lstm", xp, w_h, s0[:1], params, False) is None
    assert P.persistent_sequence("gru", *ref.problem("gru", 2, 2, 8)[:3], (), False) is None
    os.environ["MLX_FASTRNN_PERSISTENT"] = "0"
    try:
        assert P.persistent_sequence("lstm", xp, w_h, s0, params, False) is None
    finally:
        del os.environ["MLX_FASTRNN_PERSISTENT"]


_GUARD = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import mlx.core as mx
    import persistent_reference as ref
    from mlx_fastrnn.kernels import persistent as P
    outs = []
    # Two independent recurrences in one evaluation: MLX may run them as
    # concurrent graph nodes, so two persistent grids share the GPU.
    for cell, seed in (("gru", 0), ("gru", 1), ("lstm", 2)):
        xp, w_h, s0, params = ref.problem(cell, 256, 64, 256, seed=seed)
        fwd = P.persistent_sequence(cell, xp, w_h, s0, params, False)
        assert fwd is not None
        seqs, hp = fwd[:-1], fwd[-1]
        prevs = ref.prevs_of(s0, seqs)
        d = ref.cotangents(cell, 256, 64, 256)
        bwd = P.persistent_backward(cell, d, xp, hp, prevs, params, w_h, True)
        outs += [fwd, bwd[0], bwd[2]]
    mx.eval(outs)
    print("OK")
    """
)


def test_deadlock_guard():
    """Forward and backward, several grids in one evaluation, in a subprocess:
    a barrier that never opens fails this test instead of hanging the run."""
    code = _GUARD.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("persistent kernels did not finish in 240 s (grid barrier deadlock?)")
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
