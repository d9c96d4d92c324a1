"""The persistent CUDA kernels, checked without a GPU.

* planning / selection / validation / source generation: pure Python;
* the exact kernel sources, run by the CPU emulator (``persistent_emulator``:
  fake-CUDA prelude, one OS thread per CUDA thread, a real grid barrier) and
  compared with the cells' reference steps: skipped without a C++20 compiler;
* an NVRTC + ptxas compile of every kernel (registers, no spills): skipped
  unless ``MLX_FASTRNN_NVRTC`` / ``MLX_FASTRNN_JIT_HEADERS`` point at a libnvrtc
  and MLX's device headers (see ``persistent_emulator``).
"""

import os

import pytest

import mlx.core as mx

import persistent_emulator as emu
import persistent_reference as ref
from mlx_fastrnn.kernels import cuda_source as S
from mlx_fastrnn.kernels import persistent as P
from mlx_fastrnn.kernels import tiled as T
from mlx_fastrnn.kernels import gpu as G
from mlx_fastrnn.kernels import tiled_plan as TP

H100 = P.Limits(num_sms=132, smem_per_block=232448, smem_per_sm=233472)
SMALL = P.Limits(num_sms=6, smem_per_block=48 * 1024, smem_per_sm=100 * 1024)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("MLX_FASTRNN_PERSISTENT", "MLX_FASTRNN_PERSISTENT_SMEM", "MLX_FASTRNN_PERSISTENT_BLOCKS",
              "MLX_FASTRNN_PERSISTENT_SWITCHES", "MLX_FASTRNN_PERSISTENT_CLUSTER", "MLX_USE_CUDA_GRAPHS",
              "MLX_FASTRNN_PERSISTENT_MMA_FIT", "MLX_FASTRNN_PERSISTENT_PIPELINE",
              "MLX_FASTRNN_PERSISTENT_HALF_ROWS"):
        monkeypatch.delenv(k, raising=False)
    # each test a process of its own for the graphs switch, started with the environment it sets
    monkeypatch.setattr(G, "_GRAPHS_AT_FIRST_USE", [])
    monkeypatch.setattr(G, "_starting_env", lambda name: os.environ.get(name))
    # The FMA projection, which these tests compare at float32 rounding; the
    # tensor-core plans (rounded operands): test_mma_cpu.py.
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_MMA", "0")


# --------------------------------------------------------------------------- planning

SHAPES = [(1, 1), (1, 33), (5, 200), (32, 200), (64, 256), (16, 512), (3, 1000), (256, 128)]


@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("B,H", SHAPES)
@pytest.mark.parametrize("limits", [H100, SMALL], ids=["h100", "small"])
def test_plan_invariants(cell, direction, B, H, limits):
    p = P.plan(direction, cell, H, B, limits)
    if p is None:
        return
    G = P.CELLS[cell].num_gates
    assert p.nblocks <= limits.num_sms  # co-resident: one block per SM at most
    assert p.smem <= P.smem_budget(limits) <= limits.smem_per_block
    assert 2 * (p.smem + limits.reserved_smem_per_block) <= limits.smem_per_sm
    assert p.NU * p.U >= H and (p.NU - 1) * p.U < H
    assert p.NBB * p.BB >= B and (p.NBB - 1) * p.BB < B
    assert p.BBP % p.RB == 0 and p.BB <= p.BBP < p.BB + p.RB
    assert p.EPT * p.TPB >= p.BB * p.U
    assert p.K == (H if direction == "forward" else G * H)
    assert p.N == (G * p.U if direction == "forward" else p.U)
    assert p.N % p.NCS == 0 and p.N <= P.MAX_N
    assert p.RB * p.N <= max(32, p.N) if p.NCS == 1 else p.RB * (p.N // p.NCS) <= 32
    assert 1 <= p.KCH <= p.K and (p.KCH == p.K or p.KCH % 32 == 0)
    assert p.smem == P.smem_bytes(p.K, p.N, p.BBP, p.KCH, p.KS, p.w_dtype.size)
    assert p.sync_words * 4 >= 16  # never MLX's scalar pool
    assert not p.w_half and p.w_dtype == mx.float32  # float32 inputs never get 16-bit weights


def test_plan_benchmark_shapes_fit_h100():
    for cell in ref.CELL_NAMES:
        for B, H in [(32, 200), (64, 256), (16, 512)]:
            for d in ("forward", "backward"):
                p = P.plan(d, cell, H, B, H100)
                assert p is not None, (cell, d, B, H)
                assert p.nblocks >= 64  # uses most of the GPU


def test_plan_none_when_weights_do_not_fit():
    # LSTM H=2048: the smallest slice is 16 units * 4 gates * 2048 * 4 B = 512 KiB.
    assert P.plan("forward", "lstm", 2048, 8, H100) is None
    assert P.plan("backward", "lstm", 2048, 8, H100) is None
    # A GPU with 1 SM cannot hold GRU H=256 in 48 KiB.
    one = P.Limits(num_sms=1, smem_per_block=48 * 1024, smem_per_sm=96 * 1024)
    assert P.plan("forward", "gru", 256, 4, one) is None
    # Nothing at all.
    assert P.plan("forward", "gru", 8, 4, None) is None
    assert P.plan("forward", "gru", 8, 4, P.Limits(num_sms=0, smem_per_block=1 << 16)) is None


def test_half_weights_only_for_half_inputs_when_needed():
    # LSTM H=1024, B=16 does not fit in float32 (FMA plans only: a tensor-core plan's W
    # is the MMA's type)...
    assert P.plan("forward", "lstm", 1024, 16, H100, x_dtype=mx.float32, mma=0) is None
    for xdt in (mx.bfloat16, mx.float16):
        for direction in ("forward", "backward"):
            p = P.plan(direction, "lstm", 1024, 16, H100, x_dtype=xdt, mma=0)
            # ... so a half input's slice is held in its own type: a float16 layer's weights
            # exactly (bfloat16 would drop 3 of their 11 significant bits)
            assert p is not None and p.w_half and p.w_dtype == xdt, (xdt, direction, p)
        small = P.plan("forward", "gru", 64, 4, H100, x_dtype=xdt)
        assert small is not None and not small.w_half and small.w_dtype == mx.float32  # float32 fits: keep it
        forced = P.plan("forward", "gru", 64, 4, H100, x_dtype=xdt, weights="half")
        assert forced.w_half and forced.w_dtype == xdt
    forced = P.plan("forward", "gru", 64, 4, H100, x_dtype=mx.float32, weights="half")
    assert forced.w_half and forced.w_dtype == mx.bfloat16  # float32's exponent range
    with pytest.raises(ValueError):
        P.plan("forward", "gru", 64, 4, H100, weights="int8")


def test_env_overrides(monkeypatch):
    base = P.plan("forward", "gru", 512, 16, H100)
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_BLOCKS", "16")
    p = P.plan("forward", "gru", 512, 16, H100)
    assert p is None or p.nblocks <= 16
    monkeypatch.delenv("MLX_FASTRNN_PERSISTENT_BLOCKS")
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_SMEM", "4096")
    assert P.plan("forward", "gru", 512, 16, H100) is None
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_SMEM", str(10**9))
    assert P.smem_budget(H100) == H100.smem_per_block
    monkeypatch.delenv("MLX_FASTRNN_PERSISTENT_SMEM")
    assert P.plan("forward", "gru", 512, 16, H100) == base
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT", "0")
    xp, w_h, _, _ = ref.problem("gru", 2, 2, 8)
    assert P.select("forward", "gru", xp, w_h, H100) is None


def test_plan_nbb_option():
    for nbb in (1, 2, 4):
        p = P.plan("forward", "gru", 256, 64, H100, nbb=nbb)
        assert p is not None and p.NBB == nbb


def test_select_validates():
    xp, w_h, _, _ = ref.problem("gru", 3, 2, 8)
    assert P.select("forward", "gru", xp, w_h, H100) is not None
    assert P.select("forward", "lstm", xp, w_h, H100) is None  # G*H mismatch
    assert P.select("forward", "nope", xp, w_h, H100) is None
    assert P.select("forward", "gru", xp[0], w_h, H100) is None  # not 3-D
    assert P.select("forward", "gru", xp, w_h.astype(mx.float16), H100) is None  # W must be f32
    assert P.select("forward", "gru", xp.astype(mx.int32), w_h, H100) is None
    assert P.select("forward", "gru", xp[:, :, :-1], w_h, H100) is None
    assert P.select("forward", "gru", xp, w_h[:, :-1], H100) is None
    assert P.select("forward", "gru", xp, w_h, None) is None  # no device limits (CPU)


def test_entry_points_fall_back_off_cuda():
    if P.cuda_available():
        pytest.skip("this machine has CUDA")
    xp, w_h, s0, params = ref.problem("gru", 3, 2, 8)
    assert P.persistent_sequence("gru", xp, w_h, s0, params, False) is None
    assert P.persistent_sequence("gru", xp, w_h, s0, params, False, limits=H100) is None
    seqs = ref.forward("gru", xp, w_h, s0, params, False)
    prevs = ref.prevs_of(s0, seqs[:-1])
    d = ref.cotangents("gru", 3, 2, 8)
    assert P.persistent_backward("gru", d, xp, seqs[-1], prevs, params, w_h, True) is None
    assert P.device_limits() is None


def test_query_limits_without_driver():
    assert P.query_cuda_limits(libname="libdefinitely_not_cuda.so.9") is None


def test_generated_source_matches_mlx_layout():
    p = P.plan("forward", "gru", 33, 3, H100)
    spec = P.kernel_spec(p, mx.bfloat16, True)
    fname, src = S.generate_source(spec, [mx.bfloat16, mx.float32, mx.float32, mx.float32],
                                   [3, 2, 2, 1], [mx.float32, mx.float32, mx.uint32])
    assert fname.startswith("custom_kernel_" + spec.name + "_bfloat16_float32_33_")
    assert fname.endswith("_1")  # the last template argument: ZS = 1 (h_0 zero)
    assert src.startswith(S.MLX_DEFAULT_HEADER + P.HEADER)
    assert "__global__ void " + fname + "(\n    const __nv_bfloat16* x,\n" \
           "    const __grid_constant__ Shape x_shape,\n    const float* w,\n" in src
    assert "    uint32_t* sync) {\n" in src
    assert "  using T = __nv_bfloat16;\n" in src and "  constexpr int ZS = 1;\n" in src
    assert "w_shape" not in src and "h0_shape" not in src and "_strides" not in src
    assert src.endswith("\n}\n\n} // namespace mlx::core::cu\n")


def test_kernel_names_follow_the_source():
    p = P.plan("backward", "rnn_relu", 16, 2, H100)
    a = P.kernel_spec(p, mx.float32, True)
    b = P.kernel_spec(p, mx.float32, False)
    assert a.name == b.name and S.template_hash(a.template) != S.template_hash(b.template)
    assert dict(a.template)["RELU"] is True
    assert P.kernel_spec(P.plan("backward", "rnn_tanh", 16, 2, H100), mx.float32, True).name != a.name
    fwd = P.kernel_spec(P.plan("forward", "rnn_relu", 16, 2, H100), mx.float32, True)
    assert fwd.name != a.name and fwd.grid[0] == fwd.threadgroup[0] * P.plan("forward", "rnn_relu", 16, 2, H100).nblocks


def test_bodies_use_only_their_names():
    """MLX adds a shape/strides/ndim parameter for every input name it finds
    followed by _shape etc. in the body: only x_shape may appear."""
    for cell in ref.CELL_NAMES:
        bodies = [(T.forward_body(cell, v), T.forward_io(cell, v)[0]) for v in (False, True)]
        bodies += [(T.backward_body(cell, v), T.backward_io(cell, v)[0]) for v in (False, True)]
        for body, names in bodies:
            assert "x_shape" in body
            for n in names:
                for suffix in ("_strides", "_ndim") + (() if n == "x" else ("_shape",)):
                    assert n + suffix not in body, (cell, n + suffix)


# --------------------------------------------------------------------------- emulator parity

needs_cxx = pytest.mark.skipif(emu.host_compiler() is None, reason="no C++ compiler for the emulator")

# (cell, L, B, H, x dtype, h0 zero / need d0, limits)
EMU_CASES = [
    ("gru", 5, 3, 33, mx.float32, False, SMALL),
    ("gru", 4, 5, 20, mx.bfloat16, True, P.Limits(num_sms=4, smem_per_block=48 * 1024, smem_per_sm=100 * 1024)),
    ("lstm", 5, 3, 33, mx.float32, False, SMALL),
    ("lstm", 3, 1, 1, mx.float16, True, SMALL),
    ("rnn_tanh", 6, 2, 17, mx.float32, False, SMALL),
    ("rnn_relu", 1, 4, 9, mx.bfloat16, False, SMALL),
    ("lstm", 3, 7, 40, mx.float32, False, P.Limits(num_sms=8, smem_per_block=6 * 1024, smem_per_sm=16 * 1024)),
    ("slstm", 5, 3, 33, mx.float32, False, SMALL),
    ("slstm", 4, 2, 20, mx.bfloat16, True, SMALL),
    ("slstm", 3, 7, 40, mx.float32, False, P.Limits(num_sms=8, smem_per_block=6 * 1024, smem_per_sm=16 * 1024)),
]


def _ids(c):
    return f"{c[0]}-L{c[1]}-B{c[2]}-H{c[3]}-{str(c[4]).split('.')[-1]}-{'zero' if c[5] else 'state'}"


def _assert_emulated_backward(cell, problem, expected, need, limits=None, *, weights="auto", plan=None,
                              w_ref=None):
    """Run the emulated backward on the reference forward's outputs and compare dx,
    dhp and (when ``need``) the initial-state cotangents with the reference
    backward (``w_ref``: the W_h it uses, default the problem's). Returns the
    emulator's (plan, sync counters)."""
    xp, w_h, s0, params = problem
    L, B, H = xp.shape[0], xp.shape[1], w_h.shape[1]
    seqs, hp = expected[:-1], expected[-1]
    prevs = ref.prevs_of(s0, seqs)
    d_outs = ref.cotangents(cell, L, B, H)
    (dx, dhp, d0), ran = emu.backward(cell, d_outs, xp, hp, prevs, params, w_h, need, limits,
                                      weights=weights, plan=plan)
    rdx, rdhp, rd0 = ref.backward(cell, d_outs, xp, hp, prevs, params, w_h if w_ref is None else w_ref, need)
    assert ref.max_rel_err(dx, rdx) < 2e-6
    assert ref.max_rel_err(dhp, rdhp) < 2e-6
    if need:
        assert len(d0) == len(rd0)
        for a, e in zip(d0, rd0):
            assert ref.max_rel_err(a, e) < 2e-6
    else:
        assert d0 is None
    return ran


@needs_cxx
@pytest.mark.parametrize("case", EMU_CASES, ids=_ids)
def test_emulated_forward_backward(case):
    cell, L, B, H, xdt, zero, limits = case
    xp, w_h, s0, params = ref.problem(cell, L, B, H, xdt)
    if zero:
        s0 = tuple(mx.zeros_like(s) for s in s0)
    expected = ref.forward(cell, xp, w_h, s0, params, zero)
    got, (p, sync) = emu.forward(cell, xp, w_h, s0, params, zero, limits)
    assert p is not None
    for a, e in zip(got, expected):
        assert ref.max_rel_err(a, e) < 2e-6
    # the barrier ran L-1 times in every batch group
    assert [int(v) for v in sync.tolist()[:: P.SYNC_STRIDE]] == [p.NU * (L - 1)] * p.NBB

    need = not zero
    pb, sync_b = _assert_emulated_backward(cell, (xp, w_h, s0, params), expected, need, limits)
    assert [int(v) for v in sync_b.tolist()[:: P.SYNC_STRIDE]] == [pb.NU * (L - 1 + need)] * pb.NBB


def _hand_plan(direction, cell, H, B, U, RB, KS, KCH, tpb=64, BB=None, NCS=1):
    """A plan with the given split (batch groups of ``BB`` rows, default one
    group; warp tasks of ``RB`` rows and ``N / NCS`` columns), bypassing the planner."""
    G = P.CELLS[cell].num_gates
    K, N = (H, G * U) if direction == "forward" else (G * H, U)
    BB = BB or B
    BBP = -(-BB // RB) * RB
    return P.Plan(direction, cell, G, H, B, U, -(-H // U), BB, -(-B // BB), BBP, RB, KS, KCH, tpb,
                  -(-(BB * U) // tpb), False, P.smem_bytes(K, N, BBP, KCH, KS, 4), 0.0, NCS=NCS)


# (direction, U, RB, KS, KCH[, NCS]): RB*N/NCS sums per warp task of 2, 8, 24, 32, 48
# (two groups of 32, the second half empty) and 128 (four full groups); column splits
# (NCS > 1) write their sums at their own columns of part.
REDUCTION_PLANS = [
    ("forward", 16, 1, 2, 64),   # N=48, 48 sums
    ("forward", 2, 4, 1, 32),    # N=6, 24 sums, K in two chunks
    ("backward", 32, 1, 2, 192),  # N=32, 32 sums
    ("backward", 64, 2, 1, 96),  # N=64, 128 sums, K in two chunks
    ("backward", 2, 1, 4, 192),  # 2 sums
    ("backward", 4, 2, 3, 192),  # 8 sums
    ("forward", 16, 4, 1, 64, 8),  # N=48 in 8 splits of 6 columns, 24 sums
    ("forward", 2, 4, 2, 32, 2),   # N=6 in 2 splits of 3, K in two chunks
    ("backward", 32, 4, 2, 96, 4),  # N=32 in 4 splits of 8, 32 sums, K in two chunks
    ("backward", 64, 2, 1, 192, 2),  # N=64 in 2 splits of 32, 64 sums
]


@needs_cxx
@pytest.mark.parametrize("switches", ["", "per_value_reduction"])
@pytest.mark.parametrize("case", REDUCTION_PLANS,
                         ids=lambda c: f"{c[0]}-U{c[1]}-RB{c[2]}" + (f"-NCS{c[5]}" if len(c) > 5 else ""))
def test_emulated_reduction_widths(case, switches, monkeypatch):
    """The projection's warp reduction (halving butterfly, or one warp sum per
    value) for every width of a warp task, through hand-made GRU splits, with and
    without column splits."""
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_SWITCHES", switches)
    direction, U, RB, KS, KCH, *ncs = case
    cell, L, B, H = "gru", 3, 4, 64
    p = _hand_plan(direction, cell, H, B, U, RB, KS, KCH, NCS=ncs[0] if ncs else 1)
    xp, w_h, s0, params = ref.problem(cell, L, B, H)
    expected = ref.forward(cell, xp, w_h, s0, params, False)
    if direction == "forward":
        got, _ = emu.forward(cell, xp, w_h, s0, params, False, None, plan=p)
        for a, e in zip(got, expected):
            assert ref.max_rel_err(a, e) < 2e-6
        return
    _assert_emulated_backward(cell, (xp, w_h, s0, params), expected, True, plan=p)


STREAMED_CASES = [  # (cell, L, B, H, x dtype, zero initial state, SMs, shared memory per block)
    ("lstm", 4, 3, 24, mx.float32, False, 6, 2816),
    ("gru", 3, 5, 20, mx.bfloat16, True, 6, 2816),
    ("rnn_tanh", 5, 2, 36, mx.float32, False, 6, 2816),
    ("slstm", 3, 2, 32, mx.float32, False, 8, 2816),
    ("lstm", 4, 2, 30, mx.float32, False, 6, 3072),  # K % 4 != 0: the forward stages W by scalars
]


@needs_cxx
@pytest.mark.parametrize("case", STREAMED_CASES, ids=lambda c: f"{c[0]}-H{c[3]}-{str(c[4]).split('.')[-1]}")
def test_emulated_streamed_weights(case):
    """W_h streamed from global memory every step (``weights="global"``, template
    ``WG``: forward W_h's rows in gate groups, backward W_h^T's rows, each K-chunk of
    the block's rows staged in shared memory), K in several chunks, several blocks
    per batch group; shared memory holds no W_h slice."""
    cell, L, B, H, xdt, zero, sms, smem = case
    limits = P.Limits(num_sms=sms, smem_per_block=smem, smem_per_sm=2 * smem + 2048)
    problem = ref.problem(cell, L, B, H, xdt)
    xp, w_h, s0, params = problem
    if zero:  # h_0 zero (the kernels' ZS bit 0: never read)
        s0 = (mx.zeros_like(s0[0]), *s0[1:])
        problem = (xp, w_h, s0, params)
    for direction in ("forward", "backward"):
        p = P.plan(direction, cell, H, B, limits, x_dtype=xdt, tpb=64, weights="global")
        assert p is not None and p.w_global and H % p.U == 0 and p.NU > 1
        assert p.smem == P.smem_bytes(p.K, p.N, p.BBP, p.KCH, p.KS, 0, True)
        if direction == "backward" and cell != "rnn_tanh":
            assert p.KCH < p.K  # K = G*H in several chunks
    got, _ = emu.forward(cell, xp, w_h, s0, params, zero, limits, weights="global")
    expected = ref.forward(cell, xp, w_h, s0, params, zero)
    for a, e in zip(got, expected):
        assert ref.max_rel_err(a, e) < 2e-6
    _assert_emulated_backward(cell, problem, expected, not zero, limits, weights="global")


def test_streamed_weights_where_no_slice_fits_by_the_measured_bound(monkeypatch):
    """``select`` streams W_h only where no shared-memory plan fits, by default only
    where the plan's cost is within ``STREAMED_MAX_CYCLES`` (B=16 H=1024 LSTM: yes;
    B=64 H=1536: no, the per-step GEMM wins), always with MLX_FASTRNN_PERSISTENT_STREAMED=1,
    never with =0; the streamed plans keep the grid within the SMs."""
    monkeypatch.delenv("MLX_FASTRNN_PERSISTENT_STREAMED", raising=False)
    big, small = mx.zeros((3, 16, 4 * 1024)), mx.zeros((3, 16, 4 * 256))
    wide, w_wide = mx.zeros((3, 64, 4 * 1536)), mx.zeros((4 * 1536, 1536))
    w_big, w_small = mx.zeros((4 * 1024, 1024)), mx.zeros((4 * 256, 256))
    for direction in ("forward", "backward"):
        p = P.select(direction, "lstm", big, w_big, H100)
        assert p is not None and p.w_global and p.nblocks <= H100.num_sms and 1024 % p.U == 0
        assert p.cost <= P.STREAMED_MAX_CYCLES
        assert not P.select(direction, "lstm", small, w_small, H100).w_global
        assert P.plan(direction, "lstm", 1536, 64, H100, weights="global").cost > P.STREAMED_MAX_CYCLES
        assert P.select(direction, "lstm", wide, w_wide, H100) is None
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_STREAMED", "1")
    for direction in ("forward", "backward"):
        assert P.select(direction, "lstm", wide, w_wide, H100).w_global
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_STREAMED", "0")
    for direction in ("forward", "backward"):
        assert P.select(direction, "lstm", big, w_big, H100) is None
        assert not P.select(direction, "lstm", small, w_small, H100).w_global


@needs_cxx
def test_emulated_streamed_weights_with_lengths_and_directions():
    """The varlen bodies with a streamed W_h: two problems (their own W_h), the
    second reversed, per-row lengths, x and out problem-interleaved (K in one chunk:
    chunks are ``test_emulated_streamed_weights``'s)."""
    limits = P.Limits(num_sms=6, smem_per_block=2560, smem_per_sm=2 * 2560 + 2048)
    cell, L, B, H = "lstm", 4, 2, 12

    def forward(*args, lens, rev, interleaved):
        p = P.plan("forward", cell, H, B, limits, tpb=64, weights="global", problems=2)
        assert p is not None and p.w_global
        return emu.forward(cell, *args, limits, plan=p, lens=lens, rev=rev, interleaved=interleaved)[0]

    def backward(*args, lens, rev, d_out, interleaved):
        p = P.plan("backward", cell, H, B, limits, tpb=64, weights="global", problems=2)
        assert p is not None and p.w_global
        return emu.backward(cell, *args, limits, plan=p, lens=lens, rev=rev, d_out=d_out,
                            interleaved=interleaved)[0]

    ref.check_varlen(cell, L, B, H, mx.float32, False, [4, 1, 3, 4], 0b10, 2, forward, backward,
                     interleaved=True)


@needs_cxx
@pytest.mark.parametrize("xdt", [mx.bfloat16, mx.float16], ids=["bf16", "f16"])
def test_emulated_chunked_and_half_weights(xdt):
    """K in several chunks (tiny shared memory) and W slices in the input's 16-bit type
    (the float16 one to float16-rounded weights: what a float16 layer holds)."""
    limits = P.Limits(num_sms=8, smem_per_block=4 * 1024, smem_per_sm=10 * 1024)
    cell, L, B, H = "gru", 3, 4, 64
    xp, w_h, s0, params = ref.problem(cell, L, B, H, xdt)
    p = P.plan("forward", cell, H, B, limits, x_dtype=xdt, tpb=64, weights="half")
    assert p is not None and p.KCH < p.K and p.w_dtype == xdt
    got, (used, _) = emu.forward(cell, xp, w_h, s0, params, False, limits, weights="half")
    assert used == p
    w_rounded = w_h.astype(xdt).astype(mx.float32)
    expected = ref.forward(cell, xp, w_rounded, s0, params, False)
    for a, e in zip(got, expected):
        assert ref.max_rel_err(a, e) < 2e-6
    pb = P.plan("backward", cell, H, B, limits, x_dtype=xdt, tpb=64, weights="half")
    assert pb is not None and pb.KCH < pb.K and pb.w_dtype == xdt
    _assert_emulated_backward(cell, (xp, w_h, s0, params), expected, True, limits, weights="half",
                              w_ref=w_rounded)


@needs_cxx
def test_emulated_slstm_forward_takes_four_elements_per_thread():
    """The sLSTM's forward may hold up to four cell elements per thread, its backward
    two (``MAX_EPT`` / ``MAX_EPT_BACKWARD``: the backward's registers): a forward plan
    with more than two runs in the emulator to the reference, and the backward of the
    same shape plans at most two or declines."""
    limits = P.Limits(num_sms=2, smem_per_block=48 * 1024, smem_per_sm=100 * 1024)
    cell, L, B, H = "slstm", 3, 10, 24
    xp, w_h, s0, params = ref.problem(cell, L, B, H)
    p = P.plan("forward", cell, H, B, limits, tpb=32)
    assert p is not None and p.EPT > 2
    got, _ = emu.forward(cell, xp, w_h, s0, params, False, limits, tpb=32)
    for a, e in zip(got, ref.forward(cell, xp, w_h, s0, params, False)):
        assert ref.max_rel_err(a, e) < 2e-6
    pb = P.plan("backward", cell, H, B, limits, tpb=32)
    assert pb is None or pb.EPT <= 2
    assert P.plan("backward", "lstm", H, B, limits, tpb=32).EPT > 2  # the LSTM's backward takes four


@needs_cxx
def test_emulated_slstm_backward_ept_fallback(monkeypatch):
    """``MLX_FASTRNN_PERSISTENT_EPT_FALLBACK`` (default on): where no backward plan holds the
    sLSTM's two elements per thread, ``select`` takes one of up to four (``gpu.MAX_EPT``)
    instead of declining (the step loop); it runs in the emulator to the reference. Off
    (``=0``) it declines; a shape the cell's own bound takes keeps that plan."""
    limits = P.Limits(num_sms=2, smem_per_block=48 * 1024, smem_per_sm=100 * 1024)
    cell, L, B, H = "slstm", 3, 10, 16
    xp, w_h, s0, params = ref.problem(cell, L, B, H)
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_EPT_FALLBACK", "0")
    assert P.select("backward", cell, xp, w_h, limits, 32) is None
    monkeypatch.delenv("MLX_FASTRNN_PERSISTENT_EPT_FALLBACK", raising=False)
    pb = P.select("backward", cell, xp, w_h, limits, 32)
    assert pb is not None and pb.EPT > 2
    small = ref.problem(cell, L, 2, H)
    assert P.select("backward", cell, small[0], small[1], limits, 32) == P.plan("backward", cell, H, 2, limits,
                                                                                 tpb=32)
    expected = ref.forward(cell, xp, w_h, s0, params, False)
    ran, _ = _assert_emulated_backward(cell, (xp, w_h, s0, params), expected, True, limits, plan=pb)
    assert ran == pb


# --------------------------------------------------------------------------- NVRTC

@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("varlen", [False, True])
def test_nvrtc_compiles_without_spills(cell, direction, varlen):
    for (B, H), xdt in (((32, 200), mx.float32), ((16, 512), mx.bfloat16), ((16, 512), mx.float16),
                        ((1, 1), mx.float16)):
        for problems, rev, xil in (((1, 1, False), (2, 0b10, False), (2, 0b10, True)) if varlen else ((1, 0, False),)):
            p = P.plan(direction, cell, H, B, H100, x_dtype=xdt, weights="half" if H == 512 else "auto",
                       problems=problems)
            _assert_compiles(p, xdt, lens=varlen, rev=rev, interleaved=xil)


@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
@pytest.mark.parametrize("cell,H,problems", [("lstm", 1024, 2), ("lstm", 2048, 1), ("gru", 1536, 1),
                                             ("gru", 2048, 1), ("rnn_tanh", 4096, 1)])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_nvrtc_compiles_streamed_weights(cell, H, problems, direction):
    """The streamed-W_h kernels of shapes no shared-memory slice holds on the H100/H200
    (B=16; with two problems also the varlen, interleaved bfloat16 body)."""
    assert P.plan(direction, cell, H, 16, H100) is None
    p = P.plan(direction, cell, H, 16, H100, weights="global")
    assert p is not None and p.w_global and p.nblocks <= H100.num_sms
    _assert_compiles(p, mx.float32)
    if problems > 1:
        p = P.plan(direction, cell, H, 16, H100, weights="global", problems=problems)
        _assert_compiles(p, mx.bfloat16, lens=True, rev=0b10, interleaved=True)


@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
@pytest.mark.parametrize("cell", ["lstm", "slstm"])
@pytest.mark.parametrize("xdt", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("cc_major", [0, 9])
def test_nvrtc_forward_four_elements_per_thread(cell, xdt, cc_major):
    """A forward at four elements per thread (8 heads of 256 at B = 64 on the H100/H200,
    as `flashrnn` runs 16 in two launches; tensor cores from compute capability 8):
    within 128 registers, at most 32 bytes spilled (NVRTC 13.0: 8-28 bytes with tensor
    cores, for the LSTM as for the sLSTM). The sLSTM's backward plans no such shape
    (``MAX_EPT_BACKWARD``: it spilled 132-396 bytes at four)."""
    limits = P.Limits(**{**H100.__dict__, "cc_major": cc_major})
    mma = 3 if xdt == mx.float32 else 1  # tf32 (as with MLX_ENABLE_TF32 on) / bfloat16
    p = P.plan("forward", cell, 256, 64, limits, x_dtype=xdt, problems=8, mma=mma)
    assert p is not None and p.EPT == 4 and bool(p.mma) == (cc_major >= 8)
    if cell == "slstm":
        assert P.plan("backward", cell, 256, 64, limits, x_dtype=xdt, problems=8) is None
    _assert_compiles(p, xdt, allowed=32)


@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
@pytest.mark.parametrize("xdt", [mx.float32, mx.bfloat16])
def test_nvrtc_slstm_backward_ept_fallback_compiles(xdt):
    """The sLSTM backward at four elements per thread (``ept_fallback_enabled``: 8 heads
    of 256 at B = 64 on the H100/H200, half of `flashrnn`'s 16) compiles within 128
    registers; it spills (NVRTC 13.0: 132-396 bytes measured), bounded here at 512."""
    p = P.plan("backward", "slstm", 256, 64, H100, x_dtype=xdt, problems=8, ept=4)
    assert p is not None and p.EPT == 4
    _assert_compiles(p, xdt, allowed=512)


def _assert_compiles(p, xdt, lens=False, rev=0, interleaved=False, allowed=None):
    """NVRTC + ptxas of plan ``p``'s kernel: at most 128 registers (two 256-thread
    blocks per SM: ``persistent.LAUNCH_BOUNDS``); no spills and no stack, except
    the few bytes the bound costs the two-problem varlen LSTM / sLSTM forward
    (``allowed``: that many bytes instead of the rules below)."""
    spec = P.kernel_spec(p, xdt, True, lens=lens, rev=rev, interleaved=interleaved)
    ok, log, (regs, spill_st, spill_ld, stack) = emu.compile_spec(spec, xdt, p.w_dtype)
    assert ok, log[-4000:]
    assert regs is not None and regs <= 128, log
    if allowed is not None:
        assert spill_st <= allowed and spill_ld <= allowed and stack <= allowed, log
        return spec
    allowed = 32 if p.NP > 1 and (lens or rev) else 0  # measured: 8-24 bytes (NVRTC 13.0)
    if p.w_global:  # streamed W_h (its K-chunk staged in shared memory): measured up to 72 bytes
        allowed = 80  # (the two-problem varlen bfloat16 LSTM forward, N = 64; NVRTC 13.0)
        if p.mma and p.EPT > 2:  # streamed tensor-core forwards of four elements a thread (B = 128,
            allowed = 128        # H = 1024, N = 48-64): 32-112 bytes (the sLSTM's most; NVRTC 13.0)
            if p.pipe:           # pipelined (MLX_FASTRNN_PERSISTENT_PIPELINE): the GRU forward's 136 bytes
                allowed = 160
    if interleaved and p.cell == "slstm":  # 32 stored / 64 loaded (no layer runs it: only bidirectional
        allowed = max(allowed, 64)          # LSTM / GRU / RNN layers read x and write out interleaved)
    assert spill_st <= allowed and spill_ld <= allowed and stack <= allowed, log
    return spec



@needs_cxx
@pytest.mark.parametrize("switch", sorted(P.SWITCHES))
def test_emulated_switches(switch, monkeypatch):
    """Each MLX_FASTRNN_PERSISTENT_SWITCHES variant gives the same results
    (LSTM, K in several chunks, initial-state gradients)."""
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_SWITCHES", f"{switch}, not_a_switch")
    assert P.switch_defines() == f"#define {P.SWITCHES[switch]} 1\n"
    limits = P.Limits(num_sms=8, smem_per_block=6 * 1024, smem_per_sm=16 * 1024)
    cell, L, B, H = "lstm", 3, 7, 40
    xp, w_h, s0, params = ref.problem(cell, L, B, H)
    assert P.plan("backward", cell, H, B, limits, tpb=64).KCH < 4 * H
    expected = ref.forward(cell, xp, w_h, s0, params, False)
    got, _ = emu.forward(cell, xp, w_h, s0, params, False, limits)
    for a, e in zip(got, expected):
        assert ref.max_rel_err(a, e) < 2e-6
    _assert_emulated_backward(cell, (xp, w_h, s0, params), expected, True, limits)


@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
@pytest.mark.parametrize("switch", sorted(P.SWITCHES))
def test_nvrtc_switch_variants_compile(switch, monkeypatch):
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_SWITCHES", switch)
    for direction in ("forward", "backward"):
        spec = _assert_compiles(P.plan(direction, "lstm", 512, 16, H100), mx.float32)
        assert P.SWITCHES[switch] in spec.header


@needs_cxx
@pytest.mark.parametrize("switches", ["", "ldcg_staging"])
@pytest.mark.parametrize("kch", [128, 192])
def test_emulated_lstm_backward_shaped_like_h100_h512(switches, kch, monkeypatch):
    """The H100 plan of the LSTM B=16 H=512 backward (U8 NU64 BB8x2 RB4 KS4, K in two
    chunks, 256 threads, initial-state gradients), where cp.async staging faulted on
    the GPU, scaled to H=64 (NU=8) so the emulator can run every thread. With
    KCH=192 the second chunk is partial, as on the H100 (K=2048, KCH=1536): the
    lanes past its end copy nothing, and their source addresses must still lie
    inside dx (the emulator aborts otherwise; the old address form ran 4 KB past
    the end of dx there, in the last batch group's last row)."""
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_SWITCHES", switches)
    cell, L, B, H = "lstm", 4, 16, 64
    p = _hand_plan("backward", cell, H, B, U=8, RB=4, KS=4, KCH=kch, tpb=256, BB=8)
    assert (p.NU, p.NBB, p.BBP, p.EPT) == (8, 2, 8, 1)
    xp, w_h, s0, params = ref.problem(cell, L, B, H)
    expected = ref.forward(cell, xp, w_h, s0, params, False)
    _, sync = _assert_emulated_backward(cell, (xp, w_h, s0, params), expected, True, plan=p)
    assert [int(v) for v in sync.tolist()[:: P.SYNC_STRIDE]] == [p.NU * L] * p.NBB


# --------------------------------------------------------------------- thread-block clusters

H200 = P.Limits(num_sms=132, smem_per_block=232448, smem_per_sm=233472, cc_major=9)


@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("B,H", SHAPES + [(8, 128), (64, 64), (64, 32)])
def test_cluster_plans(cell, direction, B, H, monkeypatch):
    """A cluster plan's batch group is one cluster of at most MAX_CLUSTER blocks (backward
    MAX_CLUSTER_BACKWARD; NU = CL), its model cost no higher than the grid plan's it
    replaced; no cluster plan before compute capability 9. By default cluster plans only
    where MLX runs without CUDA graphs (MLX_USE_CUDA_GRAPHS=0), and not there with
    MLX_FASTRNN_PERSISTENT_CLUSTER=0."""
    on = P.plan(direction, cell, H, B, H200, cluster=True)
    off = P.plan(direction, cell, H, B, H200, cluster=False)
    assert (on is None) == (off is None)
    if on is None:
        return
    assert off.CL == 0
    assert on.cost <= off.cost
    if on.CL:
        most = TP.MAX_CLUSTER if direction == "forward" else TP.MAX_CLUSTER_BACKWARD
        assert on.NU == on.CL <= most and on.nblocks % on.CL == 0
        assert on.NU * on.U >= H and (on.NU - 1) * on.U < H and on.N <= P.MAX_N
    assert P.plan(direction, cell, H, B, P.Limits(**{**H200.__dict__, "cc_major": 8}), cluster=True).CL == 0
    for graphs, switch, want in ((None, None, off), ("1", "1", off), ("0", None, on), ("0", "0", off),
                                 (" 00", None, on), ("false", None, off), (" 2", None, off)):
        for name, value in (("MLX_USE_CUDA_GRAPHS", graphs), ("MLX_FASTRNN_PERSISTENT_CLUSTER", switch)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        monkeypatch.setattr(G, "_GRAPHS_AT_FIRST_USE", [])  # a process whose first question is this
        assert P.plan(direction, cell, H, B, H200) == want, (graphs, switch)


def test_graphs_switched_off_in_process_still_count_as_on(monkeypatch):
    """MLX reads MLX_USE_CUDA_GRAPHS once, at its first kernel: a process that first
    ran with graphs and then set the variable to 0 may still be recording graphs, so
    no cluster plan (e.g. an in-process A/B of the variable)."""
    monkeypatch.delenv("MLX_USE_CUDA_GRAPHS", raising=False)
    monkeypatch.setattr(G, "_GRAPHS_AT_FIRST_USE", [])
    assert G.mlx_cuda_graphs() and not TP.clusters_enabled()
    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "0")
    assert G.mlx_cuda_graphs() and not TP.clusters_enabled()
    assert P.plan("forward", "gru", 128, 8, H200).CL == 0
    monkeypatch.setattr(G, "_GRAPHS_AT_FIRST_USE", [])  # a process started with it at 0
    assert not G.mlx_cuda_graphs() and TP.clusters_enabled()
    assert P.plan("forward", "gru", 128, 8, H200).CL > 0
    # a process started without it that set it to 0 before its first question (MLX may
    # have run a kernel, with graphs, before that)
    monkeypatch.setattr(G, "_GRAPHS_AT_FIRST_USE", [])
    monkeypatch.setattr(G, "_starting_env", lambda name: None)
    assert G.mlx_cuda_graphs() and P.plan("forward", "gru", 128, 8, H200).CL == 0


def test_starting_environment_is_read_from_the_process():
    """``gpu._starting_env`` reads the environment the process started with, not
    os.environ's later changes."""
    import subprocess
    import sys

    code = ("import os; from mlx_fastrnn.kernels import gpu; os.environ['FRNN_PROBE_B'] = 'later'; "
            "print(gpu._starting_env('FRNN_PROBE_A'), gpu._starting_env('FRNN_PROBE_B'))")
    env = {**os.environ, "FRNN_PROBE_A": "0"}
    env.pop("FRNN_PROBE_B", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "None"]


def test_cluster_plans_where_the_group_fits_a_cluster():
    """Small-batch H = 96-200 problems (the grid barrier's shapes) get cluster plans;
    a unit split wider than MAX_N per block does not exist (GRU H = 256 at 8 blocks)."""
    assert P.plan("forward", "gru", 128, 8, H200, cluster=True).CL > 0
    assert P.plan("backward", "gru", 128, 8, H200, cluster=True).CL > 0
    assert P.plan("forward", "rnn_tanh", 200, 32, H200, cluster=True).CL > 0
    assert all(P.plan("forward", "gru", 256, B, H200, cluster=True).CL == 0 for B in (1, 8, 64))


# a small GPU with clusters: few enough SMs that small problems split over several blocks
CLUSTER_GPU = P.Limits(num_sms=16, smem_per_block=48 * 1024, smem_per_sm=100 * 1024, cc_major=9)


@needs_cxx
@pytest.mark.parametrize("cell,L,B,H,xdt,zero", [
    ("gru", 5, 3, 40, mx.float32, False), ("lstm", 4, 4, 24, mx.bfloat16, True),
    ("rnn_tanh", 6, 2, 50, mx.float32, False), ("slstm", 3, 2, 20, mx.float32, False),
])
def test_emulated_cluster_plans(cell, L, B, H, xdt, zero, monkeypatch):
    """The kernels of cluster plans (NU <= 8 blocks a group, wider unit slices) against the
    reference, forward and backward; the source carries the cluster's size. The emulator
    runs the group's grid barrier in place of the cluster barrier (no clusters on a CPU):
    what it checks is the plan's split and its plumbing, the barrier itself the GPU tests."""
    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "0")
    limits = CLUSTER_GPU
    xp, w_h, s0, params = ref.problem(cell, L, B, H, xdt)
    if zero:
        s0 = tuple(mx.zeros_like(s) for s in s0)
    expected = ref.forward(cell, xp, w_h, s0, params, zero)
    got, (p, _) = emu.forward(cell, xp, w_h, s0, params, zero, limits)
    assert p.CL > 0, p
    assert f"__cluster_dims__({p.CL}, 1, 1)" in P.kernel_spec(p, xdt, zero).header
    for a, e in zip(got, expected):
        assert ref.max_rel_err(a, e) < 2e-6
    pb, _ = _assert_emulated_backward(cell, (xp, w_h, s0, params), expected, not zero, limits)
    assert pb.CL > 0, pb


@needs_cxx
def test_emulated_cluster_plan_with_lengths_and_directions(monkeypatch):
    """Two problems (one reversed) with per-row lengths in a cluster plan."""
    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "0")
    limits = CLUSTER_GPU
    cell, L, B, H = "gru", 5, 2, 30

    def forward(*args, lens, rev, **kw):
        p = P.select("forward", cell, args[0], args[1], limits, 64)
        assert p is not None and p.CL > 0, p
        out, _ = emu.forward(cell, *args, limits, plan=p, lens=lens, rev=rev, **kw)
        return out

    def backward(*args, lens, rev, d_out, **kw):
        p = P.select("backward", cell, args[1], args[5], limits, 64)
        assert p is not None and p.CL > 0, p
        out, _ = emu.backward(cell, *args, limits, plan=p, lens=lens, rev=rev, d_out=d_out, **kw)
        return out

    ref.check_varlen(cell, L, B, H, mx.float32, False, [5, 1, 3, 4], 0b10, 2, forward, backward)


@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_nvrtc_compiles_cluster_plans(cell, direction):
    """Cluster plans compile for sm_90 (the cluster barrier's PTX, ``__cluster_dims__``),
    within the launch bounds, without spills; plain and varlen (two problems)."""
    for xdt in (mx.float32, mx.bfloat16):
        for problems, rev in ((1, 0), (2, 0b10)):
            # the first of these shapes the model gives a cluster plan
            plans = (P.plan(direction, cell, H, B, H200, x_dtype=xdt, problems=problems, cluster=True, mma=0)
                     for B, H in ((8, 128), (64, 64), (16, 32), (64, 32)))
            p = next((q for q in plans if q is not None and q.CL), None)
            assert p is not None, (cell, direction, xdt, problems)
            spec = _assert_compiles(p, xdt, lens=bool(rev), rev=rev)
            assert f"__cluster_dims__({p.CL}, 1, 1)" in spec.header
            # the cluster barrier, not the grid barrier's counter, in the PTX
            ok, log, ptx = emu.compile_spec(spec, xdt, p.w_dtype, ptx=True)
            assert ok, log[-3000:]
            assert f".reqnctapercluster {p.CL}, 1, 1" in ptx
            assert "barrier.cluster.arrive" in ptx and "barrier.cluster.wait" in ptx
            assert "red.release" not in ptx and "ld.acquire" not in ptx


# --------------------------------------------------------------------- several problems in one launch

@needs_cxx
@pytest.mark.parametrize("cell,L,B,H,xdt,zero", [
    ("gru", 4, 3, 20, mx.float32, False), ("lstm", 3, 2, 17, mx.bfloat16, True),
    ("rnn_relu", 5, 1, 9, mx.float32, False), ("slstm", 3, 2, 12, mx.float32, False),
])
def test_emulated_two_problems_in_one_launch(cell, L, B, H, xdt, zero):
    """Two problems (a bidirectional layer's directions) in one launch equal each
    problem run alone: outputs, dx/dhp and the initial-state cotangents; each
    problem's batch groups keep their own barrier counter."""
    parts, (xp, w, s0, params) = ref.stacked_problems(cell, 2, L, B, H, xdt, zero)
    got, (p, sync) = emu.forward(cell, xp, w, s0, params, zero, SMALL)
    assert p is not None and p.NP == 2 and p.nblocks <= SMALL.num_sms
    expected = [ref.forward(cell, *part, zero) for part in parts]
    for i, a in enumerate(got):
        assert ref.max_rel_err(a, mx.concatenate([e[i] for e in expected], axis=1)) < 2e-6
    assert [int(v) for v in sync.tolist()[:: P.SYNC_STRIDE]] == [p.NU * (L - 1)] * (p.NBB * 2)

    need = not zero
    seqs, hp = got[:-1], got[-1]
    prevs = ref.prevs_of(s0, seqs)
    d_outs = ref.cotangents(cell, L, 2 * B, H)
    got, _ = emu.backward(cell, d_outs, xp, hp, prevs, params, w, need, SMALL)
    ref.check_problems_backward(cell, parts, got, d_outs, hp, prevs, need, 2e-6)


def test_plan_splits_blocks_between_problems():
    one = P.plan("forward", "lstm", 200, 32, H100)
    two = P.plan("forward", "lstm", 200, 32, H100, problems=2)
    assert two.NP == 2 and two.nblocks <= H100.num_sms and two.NU * two.NBB <= H100.num_sms // 2
    assert one.NP == 1


def test_multi_problem_switch(monkeypatch):
    monkeypatch.delenv("MLX_FASTRNN_PERSISTENT_PROBLEMS", raising=False)
    # by default: a multi-head layer's heads and a bidirectional layer's directions
    # (second reversed in the kernel; where one launch pays: classes.accepts)
    assert P.multi_problem_enabled("heads") and P.multi_problem_enabled("directions")
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_PROBLEMS", "1")
    assert P.multi_problem_enabled("directions")
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_PROBLEMS", "0")
    assert not P.multi_problem_enabled("directions")
    assert not P.multi_problem_enabled("heads")
    with pytest.raises(ValueError, match="kind"):
        P.multi_problem_enabled("layers")


# --------------------------------------------------------------------------- lengths and directions

TINY = P.Limits(num_sms=8, smem_per_block=6 * 1024, smem_per_sm=16 * 1024)  # several blocks per group

# (cell, L, B, H, x dtype, zero initial state, lengths or None, REV mask, problems, limits)
VARLEN_CASES = [
    ("lstm", 5, 3, 20, mx.float32, False, [5, 2, 1], 0, 1, SMALL),
    ("gru", 4, 3, 17, mx.float32, False, None, 1, 1, SMALL),
    ("gru", 6, 4, 24, mx.float32, False, [6, 3, 1, 4], 1, 1, SMALL),
    ("rnn_tanh", 5, 3, 9, mx.float32, True, [2, 5, 3], 1, 1, SMALL),
    ("rnn_relu", 4, 2, 11, mx.bfloat16, False, [1, 4], 0, 1, SMALL),
    ("slstm", 5, 3, 12, mx.float32, False, [4, 1, 5], 1, 1, SMALL),
    ("lstm", 6, 3, 40, mx.float32, False, [6, 1, 4], 1, 1, TINY),
    ("lstm", 4, 2, 12, mx.bfloat16, True, [3, 4, 4, 1], 2, 2, SMALL),
    ("gru", 5, 2, 10, mx.float32, False, [5, 2, 3, 5], 2, 2, SMALL),
    ("rnn_tanh", 3, 2, 8, mx.float32, False, None, 2, 2, SMALL),
    ("slstm", 4, 2, 9, mx.float32, False, [2, 4, 4, 3], 2, 2, SMALL),
]


def _varlen_id(c):
    return (f"{c[0]}-L{c[1]}-B{c[2]}-H{c[3]}-{str(c[4]).split('.')[-1]}-{'zero' if c[5] else 'state'}"
            f"-{'lens' if c[6] else 'full'}-rev{c[7]}-np{c[8]}{'-tiny' if c[9] is TINY else ''}")


@needs_cxx
@pytest.mark.parametrize("case", VARLEN_CASES, ids=_varlen_id)
def test_emulated_lengths_and_directions(case):
    """Per-row lengths and per-problem directions inside the tiled kernels
    (``ref.check_varlen``: forward against a masked MLX reference, backward
    against its ``mx.vjp``); every batch group's barrier ran L-1 times."""
    cell, L, B, H, xdt, zero, lens, rev, problems, limits = case

    def forward(*args, lens, rev):
        got, (p, sync) = emu.forward(cell, *args, limits, lens=lens, rev=rev)
        assert p is not None and p.NP == problems
        assert [int(v) for v in sync.tolist()[:: P.SYNC_STRIDE]] == [p.NU * (L - 1)] * (p.NBB * problems)
        return got

    def backward(*args, lens, rev, d_out):
        return emu.backward(cell, *args, limits, lens=lens, rev=rev, d_out=d_out)[0]

    ref.check_varlen(cell, L, B, H, xdt, zero, lens, rev, problems, forward, backward)


# (cell, L, B, H, x dtype, zero initial state, lengths or None, REV mask, problems)
INTERLEAVED_CASES = [
    ("lstm", 4, 2, 12, mx.float32, False, [3, 4, 4, 1], 0b10, 2),
    ("gru", 5, 3, 10, mx.bfloat16, True, None, 0b10, 2),
    ("rnn_tanh", 3, 2, 8, mx.float32, False, [1, 3, 2, 3, 3, 2], 0b101, 3),
    ("slstm", 4, 2, 9, mx.float32, False, None, 0, 2),
]


@needs_cxx
@pytest.mark.parametrize("case", INTERLEAVED_CASES, ids=lambda c: f"{c[0]}-np{c[8]}-rev{c[7]}")
def test_emulated_problem_interleaved_io(case):
    """``XIL``: x, out, dx and the out cotangent problem-interleaved (a
    bidirectional layer's projection and output as they are), the state
    sequences problem-major; against the masked reference and its vjp."""
    cell, L, B, H, xdt, zero, lens, rev, problems = case

    def forward(*args, lens, rev, interleaved):
        return emu.forward(cell, *args, SMALL, lens=lens, rev=rev, interleaved=interleaved)[0]

    def backward(*args, lens, rev, d_out, interleaved):
        return emu.backward(cell, *args, SMALL, lens=lens, rev=rev, d_out=d_out, interleaved=interleaved)[0]

    ref.check_varlen(cell, L, B, H, xdt, zero, lens, rev, problems, forward, backward, interleaved=True)


@needs_cxx
def test_emulated_full_lengths_equal_the_plain_kernel():
    """Lengths all equal to L, no reversal: the varlen kernel gives the plain one's numbers."""
    cell, L, B, H = "gru", 4, 3, 16
    xp, w_h, s0, params = ref.problem(cell, L, B, H)
    plain, _ = emu.forward(cell, xp, w_h, s0, params, False, SMALL)
    varlen, _ = emu.forward(cell, xp, w_h, s0, params, False, SMALL, lens=mx.array([L] * B, mx.int32))
    for a, e in zip(varlen, plain):
        assert ref.max_rel_err(a, e) == 0.0
    assert ref.max_rel_err(varlen[-1], plain[0]) == 0.0  # out = h in position order


@needs_cxx
def test_emulated_lengths_out_of_range_are_clamped():
    """Lengths outside 1..L (the layers refuse them; a direct caller might not)
    are clamped to 0..L inside the kernel: no access outside the arrays (run
    with MLX_FASTRNN_EMU_SANITIZE=1 to have AddressSanitizer check it), and the
    numbers of the clamped lengths; a row of length 0 keeps its initial state."""
    cell, L, B, H = "lstm", 4, 3, 10
    xp, w_h, s0, params = ref.problem(cell, L, B, H)
    bad, _ = emu.forward(cell, xp, w_h, s0, params, False, SMALL, lens=mx.array([L + 5, -2, 2], mx.int32), rev=1)
    good, _ = emu.forward(cell, xp, w_h, s0, params, False, SMALL, lens=mx.array([L, 0, 2], mx.int32), rev=1)
    for a, e in zip(bad, good):
        assert ref.max_rel_err(a, e) == 0.0
    h_seq, out = good[0], good[-1]
    assert ref.max_rel_err(h_seq[:, 1], mx.broadcast_to(s0[0][1], (L, H))) == 0.0
    assert float(mx.abs(out[:, 1]).max()) == 0.0


def test_directions_must_name_the_launch_problems():
    xp, w_h, s0, params = ref.problem("gru", 3, 2, 8)
    p = P.select("forward", "gru", xp, w_h, SMALL)
    assert P.forward_launch(p, xp, w_h, s0, params, False, rev=2) is None  # one problem: bit 1 names none
    with pytest.raises(ValueError):
        P.forward_launch(p, xp, w_h, s0, params, False, rev=-1)
