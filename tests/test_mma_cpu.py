"""The tiled class's tensor-core projection (``Plan.mma``), checked without a GPU.

* planning: which layers get tensor-core plans (their dtype, ``MLX_ENABLE_TF32``,
  ``MLX_FASTRNN_PERSISTENT_MMA``), the padded shared-memory layout and its bank
  spread;
* the exact kernel sources in the CPU emulator, whose ``mma_tile`` implements
  PTX's fragment layouts of mma.sync (the same layouts a one-warp probe checked on
  the H200): against the reference loop with the projection's operands rounded as
  the plan rounds them (``ref.forward(..., mma=)``), so a wrong fragment, row tile,
  K-split, K-chunk or padding shows as an error far above float32 rounding;
* NVRTC + ptxas of the tensor-core kernels (registers, no spills), where configured.
"""

import pytest

import mlx.core as mx

import persistent_emulator as emu
import persistent_reference as ref
from mlx_fastrnn.kernels import gpu
from mlx_fastrnn.kernels import persistent as P
from mlx_fastrnn.kernels import tiled_plan as TP

H200 = P.Limits(num_sms=132, smem_per_block=232448, smem_per_sm=233472, cc_major=9)
LIM = P.Limits(num_sms=8, smem_per_block=48 * 1024, smem_per_sm=100 * 1024, cc_major=9)
CHUNKED = P.Limits(num_sms=8, smem_per_block=9 * 1024, smem_per_sm=20 * 1024, cc_major=9)  # K in chunks

needs_cxx = pytest.mark.skipif(emu.host_compiler() is None, reason="no C++ compiler for the emulator")
needs_nvrtc = pytest.mark.skipif(emu.nvrtc_paths() is None,
                                 reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
KIND = {mx.bfloat16: gpu.MMA_BF16, mx.float16: gpu.MMA_F16, mx.float32: gpu.MMA_TF32}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("MLX_FASTRNN_PERSISTENT", "MLX_FASTRNN_PERSISTENT_SMEM", "MLX_FASTRNN_PERSISTENT_BLOCKS",
              "MLX_FASTRNN_PERSISTENT_SWITCHES", "MLX_FASTRNN_PERSISTENT_MMA", "MLX_FASTRNN_PERSISTENT_MMA_FIT",
              "MLX_FASTRNN_PERSISTENT_PIPELINE", "MLX_FASTRNN_PERSISTENT_STREAMED",
              "MLX_FASTRNN_PERSISTENT_HALF_ROWS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLX_ENABLE_TF32", "1")


# --------------------------------------------------------------------------- planning


def test_mma_kind_follows_the_dtype_and_mlx_tf32_switch(monkeypatch):
    assert gpu.mma_kind(mx.bfloat16) == gpu.MMA_BF16
    assert gpu.mma_kind(mx.float16) == gpu.MMA_F16
    assert gpu.mma_kind(mx.float32) == gpu.MMA_TF32
    monkeypatch.setenv("MLX_ENABLE_TF32", "0")  # MLX's own switch: full float32
    assert gpu.mma_kind(mx.float32) == gpu.MMA_NONE
    assert gpu.mma_kind(mx.bfloat16) == gpu.MMA_BF16
    monkeypatch.delenv("MLX_ENABLE_TF32")  # MLX's default: on
    assert gpu.mma_kind(mx.float32) == gpu.MMA_TF32
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_MMA", "0")
    assert gpu.mma_kind(mx.bfloat16) == gpu.MMA_NONE


@pytest.mark.parametrize("xdt", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
def test_default_plan_uses_tensor_cores_where_the_projection_dominates(xdt, monkeypatch):
    # B=64 rows of a 4-head LSTM of 256 (FlashRNN's N=4 D=256): FMA 16-65 us a step
    p = TP.plan("forward", "lstm", 256, 64, H200, x_dtype=xdt, problems=4)
    assert p is not None and p.mma == KIND[xdt] and p.RB == 8 and p.BBP % 8 == 0
    fma = TP.plan("forward", "lstm", 256, 64, H200, x_dtype=xdt, problems=4, mma=0)
    assert fma.mma == 0 and p.cost < TP.MMA_MARGIN * fma.cost
    # one row at H=64: nothing to gain, the FMA plan stays
    assert TP.plan("forward", "lstm", 64, 1, H200, x_dtype=xdt).mma == 0
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_MMA", "0")
    assert TP.plan("forward", "lstm", 256, 64, H200, x_dtype=xdt, problems=4).mma == 0
    if xdt == mx.float32:
        monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_MMA", "1")
        monkeypatch.setenv("MLX_ENABLE_TF32", "0")
        assert TP.plan("forward", "lstm", 256, 64, H200, x_dtype=xdt, problems=4).mma == 0


@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("B,H", [(1, 1), (5, 200), (64, 256), (16, 512), (256, 128), (3, 1000)])
@pytest.mark.parametrize("xdt", [mx.float32, mx.bfloat16, mx.float16], ids=["tf32", "bf16", "f16"])
def test_mma_plan_invariants(cell, direction, B, H, xdt):
    p = TP.plan(direction, cell, H, B, H200, x_dtype=xdt, weights="mma")
    if xdt == mx.float16 and direction == "backward":
        assert p is None  # float16 cotangents: FMA only
    if p is None:
        return
    kind = KIND[xdt]
    assert p.mma == kind and not p.w_global and p.NCS == 1 and p.RB == 8
    assert p.BBP % 8 == 0 and p.BB <= p.BBP < p.BB + 8
    assert p.nblocks <= H200.num_sms and p.smem <= P.smem_budget(H200)
    assert p.w_dtype == {gpu.MMA_BF16: mx.bfloat16, gpu.MMA_F16: mx.float16, gpu.MMA_TF32: mx.float32}[kind]
    wb = 4 if kind == gpu.MMA_TF32 else 2
    assert p.smem == TP.smem_bytes(p.K, p.N, p.BBP, p.KCH, p.KS, wb, mma=kind)
    assert p.KCH % 16 == 0 and (p.KCH >= p.K or p.KCH % 32 == 0) and p.KCH >= 16
    # the padded strides cover every k-step a chunk reads, and spread a fragment
    # load's 32 lanes over 32 banks
    k16 = -(-p.K // 16) * 16
    assert p.wld >= k16 and p.hld >= p.KCH
    g, t = [l >> 2 for l in range(32)], [l & 3 for l in range(32)]
    if kind == gpu.MMA_TF32:
        w_banks = {(gi * p.wld + ti) % 32 for gi, ti in zip(g, t)}
        h_banks = {(gi * p.hld + ti) % 32 for gi, ti in zip(g, t)}
        assert len(w_banks) == 32 and len(h_banks) == 32
    else:
        w_banks = {(gi * p.wld // 2 + ti) % 32 for gi, ti in zip(g, t)}  # 16-bit pairs: one word
        assert len(w_banks) == 32
        for half in (range(16), range(16, 32)):  # float pairs: two 16-lane phases of 64-bit loads
            words = [(g[i] * p.hld + 2 * t[i] + e) % 32 for i in half for e in (0, 1)]
            assert len(set(words)) == 32


def test_no_tensor_cores_before_ampere_or_for_a_float16_backward():
    for cc in (0, 7):  # unknown, Volta / Turing: mma.sync bf16 / tf32 need sm_80
        old = P.Limits(**{**H200.__dict__, "cc_major": cc})
        assert TP.plan("forward", "lstm", 256, 64, old, x_dtype=mx.bfloat16, weights="mma", problems=4) is None
        assert TP.plan("forward", "lstm", 256, 64, old, x_dtype=mx.bfloat16, problems=4).mma == 0
    # float16 cotangents would underflow (bfloat16 / tf32 keep float32's range): FMA backward
    assert TP.plan("forward", "lstm", 256, 64, H200, x_dtype=mx.float16, problems=4).mma == gpu.MMA_F16
    assert TP.plan("backward", "lstm", 256, 64, H200, x_dtype=mx.float16, weights="mma", problems=4) is None
    assert TP.plan("backward", "lstm", 256, 64, H200, x_dtype=mx.float16, problems=4).mma == 0
    assert TP.plan("backward", "lstm", 256, 64, H200, x_dtype=mx.bfloat16, problems=4).mma == gpu.MMA_BF16


def test_mma_plans_only_where_the_padded_slice_fits():
    # float32 LSTM H=1024: even 16 rows of tf32 W (16 x 1028 x 4 B) over 132 SMs do not fit
    assert TP.plan("forward", "lstm", 1024, 16, H200, x_dtype=mx.float32, weights="mma") is None
    p = TP.plan("forward", "lstm", 1024, 16, H200, x_dtype=mx.bfloat16, weights="mma")
    assert p is None or p.smem <= P.smem_budget(H200)
    with pytest.raises(ValueError):
        TP.plan("forward", "gru", 64, 4, H200, weights="tensor")


def test_fewer_k_splits_where_the_warp_filling_split_does_not_fit(monkeypatch):
    # LSTM H = 1024 at B = 128 in bfloat16, 8 units a block: the W slice (32 rows) fits,
    # but not beside the partial sums of two K-splits; one K-split does
    monkeypatch.delenv("MLX_FASTRNN_PERSISTENT_MMA_FIT", raising=False)
    p = TP.plan("forward", "lstm", 1024, 128, H200, x_dtype=mx.bfloat16, weights="mma")
    assert p is not None and p.mma == gpu.MMA_BF16 and not p.w_global and p.smem <= P.smem_budget(H200)
    w_bytes, budget = 2, P.smem_budget(H200)
    assert p.KS == 1 and TP._mma_chunk(p.K, p.N, p.BBP, 2, w_bytes, budget, p.mma, False) is None  # two: no room
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_MMA_FIT", "0")  # the plans of before
    assert TP.plan("forward", "lstm", 1024, 128, H200, x_dtype=mx.bfloat16, weights="mma") is None
    assert TP.plan("forward", "lstm", 1024, 128, H200, x_dtype=mx.bfloat16).mma == 0
    assert TP.plan("forward", "lstm", 2048, 8, H200, x_dtype=mx.bfloat16, weights="global").mma == 0


def _select(direction, cell, B, H, xdt):
    from mlx_fastrnn.kernels.classes import Operand
    G = gpu.CELLS[cell].num_gates
    return P.select(direction, cell, Operand((50, B, G * H), xdt, 3), Operand((G * H, H), mx.float32, 2), H200)


def test_streamed_tensor_cores_where_the_slice_starves_or_none_fits(monkeypatch):
    """``select``'s streamed tensor-core plans (H200 limits): in place of a slice plan
    the shared memory starves (LSTM 128 x 1024 bfloat16: the backward's FMA plan of 64
    staged columns a chunk), of a streamed FMA plan, and of the per-step cells only
    within the grid's L2 bound (LSTM 64 x 1536's backward: four batch groups each
    reading all of W_h: the per-step cells); MLX_FASTRNN_PERSISTENT_MMA_FIT=0 keeps
    the plans of before."""
    for k in ("MLX_FASTRNN_PERSISTENT_MMA_FIT", "MLX_FASTRNN_PERSISTENT_STREAMED"):
        monkeypatch.delenv(k, raising=False)
    for direction in ("forward", "backward"):
        p = _select(direction, "lstm", 128, 1024, mx.bfloat16)
        assert p.w_global and p.mma == gpu.MMA_BF16
        slice_plan = TP.plan(direction, "lstm", 1024, 128, H200, x_dtype=mx.bfloat16)
        assert not slice_plan.w_global and slice_plan.cost > P.STREAMED_MIN_CYCLES
        assert p.cost < TP.MMA_MARGIN * slice_plan.cost
        assert not _select(direction, "lstm", 16, 1024, mx.bfloat16).w_global  # the slice plan is fine there
        q = _select(direction, "gru", 64, 1536, mx.float32)
        assert q.w_global and q.mma == gpu.MMA_TF32
        if direction == "backward":  # the streamed FMA plan would run there: replaced whatever the bytes
            assert P._streamed_fma_runs(direction, "gru", 1536, 64, H200, mx.float32, 256, 1)
        else:  # the per-step cells, replaced within the bound
            assert not P._streamed_fma_runs(direction, "gru", 1536, 64, H200, mx.float32, 256, 1)
            assert q.step_l2_bytes <= P.STREAMED_MMA_MAX_L2_BYTES
    for xdt in (mx.float32, mx.bfloat16):
        f = _select("forward", "lstm", 64, 1536, xdt)
        assert f.w_global and f.mma and f.step_l2_bytes <= P.STREAMED_MMA_MAX_L2_BYTES
        g = TP.plan("backward", "lstm", 1536, 64, H200, x_dtype=xdt, weights="global")
        assert g.mma and g.step_l2_bytes > P.STREAMED_MMA_MAX_L2_BYTES and g.NBB > 1
        assert _select("backward", "lstm", 64, 1536, xdt) is None  # the per-step cells
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_MMA_FIT", "0")
    assert _select("forward", "lstm", 128, 1024, mx.bfloat16).mma == 0
    assert _select("forward", "lstm", 128, 1024, mx.float32) is None
    assert not _select("forward", "lstm", 8, 2048, mx.bfloat16).mma


def test_step_l2_bytes():
    p = TP.plan("backward", "lstm", 1536, 64, H200, x_dtype=mx.bfloat16, weights="mma_global")
    assert p.step_l2_bytes == p.nblocks * p.BBP * 4 * 1536 * 4 + p.NBB * 4 * 1536 * 1536 * 2
    q = TP.plan("forward", "lstm", 256, 64, H200, x_dtype=mx.bfloat16, problems=4)
    assert not q.w_global and q.step_l2_bytes == q.nblocks * q.BBP * 256 * 4


# --------------------------------------------------------------------------- emulated kernels

# (cell, L, B, H, x dtype, zero initial state, limits, what the plans must show)
EMU_CASES = [
    ("lstm", 4, 10, 24, mx.float32, False, LIM, "two batch groups"),
    ("gru", 3, 9, 20, mx.bfloat16, False, LIM, "K-splits"),
    ("lstm", 3, 5, 40, mx.float16, True, LIM, "K % 16 != 0 (zero padding)"),
    ("slstm", 3, 17, 16, mx.float32, False, LIM, "four states"),
    ("rnn_relu", 3, 3, 50, mx.float32, False, LIM, "N % 16 != 0"),
    ("rnn_tanh", 2, 72, 16, mx.float32, False, LIM, "row-tile groups"),  # one batch group: 9 row tiles
    ("gru", 3, 4, 64, mx.bfloat16, False, CHUNKED, "K-chunks"),
    ("lstm", 3, 10, 24, mx.float32, False, LIM, "cluster plans"),  # the cluster's kernel, grid barrier emulated
    # W_h streamed (each K-chunk of the block's rows staged in the slice's padded layout)
    ("lstm", 3, 10, 24, mx.float32, False, LIM, "streamed W_h, N % 16 != 0"),  # tf32, 16-byte staging
    ("gru", 3, 9, 20, mx.bfloat16, False, LIM, "streamed W_h, element staging"),  # K % 8 != 0
    ("gru", 3, 4, 64, mx.bfloat16, False, CHUNKED, "streamed W_h in K-chunks"),  # cp.async staging
    ("slstm", 3, 17, 32, mx.bfloat16, True, CHUNKED, "streamed W_h in K-chunks"),
    ("rnn_tanh", 3, 9, 40, mx.float16, False, CHUNKED, "streamed W_h, K % 16 != 0"),
    ("lstm", 3, 6, 30, mx.float32, False, LIM, "streamed W_h, element staging"),  # tf32: rounded there
]


def _emu_id(c):
    return f"{c[0]}-L{c[1]}-B{c[2]}-H{c[3]}-{str(c[4]).split('.')[-1]}-{c[7].split()[0]}"


def _plan_shows(p, what):
    """Whether plan ``p`` has the feature the case is there for."""
    NT = p.BBP // 8
    return {
        "two batch groups": p.NBB >= 2,
        "K-splits": p.KS >= 2,
        "K % 16 != 0 (zero padding)": p.K % 16 != 0,
        "four states": True,
        "N % 16 != 0": p.N % 16 != 0,
        "row-tile groups": NT // TP.mma_tiles_per_task(NT) >= 2,
        "K-chunks": p.KCH < p.K,
        "cluster plans": p.CL > 0,
        "streamed W_h, N % 16 != 0": p.w_global and p.mma and p.N % 16 != 0,
        "streamed W_h, element staging": p.w_global and p.mma and p.K % (16 // p.w_dtype.size) != 0,
        "streamed W_h in K-chunks": p.w_global and p.mma and p.KCH < p.K and p.K % p.KCH != 0,
        "streamed W_h, K % 16 != 0": p.w_global and p.mma and p.K % 16 != 0,
        "pipelined": p.pipe and not p.w_global,
        "streamed W_h, pipelined": p.pipe and p.w_global,
    }[what]


@needs_cxx
@pytest.mark.parametrize("case", EMU_CASES, ids=_emu_id)
def test_emulated_mma_forward_backward(case):
    cell, L, B, H, xdt, zero, limits, what = case
    xp, w_h, s0, params = ref.problem(cell, L, B, H, xdt)
    if zero:
        s0 = tuple(mx.zeros_like(s) for s in s0)
    nbb = 1 if what == "row-tile groups" else None
    cluster = what == "cluster plans"
    streamed = what.startswith("streamed")
    mma_w = "mma_global" if streamed else "mma"
    pf = TP.plan("forward", cell, H, B, limits, x_dtype=xdt, tpb=64, weights=mma_w, nbb=nbb, cluster=cluster)
    # a float16 backward keeps the FMA projection (its cotangents would underflow)
    pb = TP.plan("backward", cell, H, B, limits, x_dtype=xdt, tpb=64, nbb=nbb, cluster=cluster,
                 **({"mma": 0, "weights": "global" if streamed else "auto"} if xdt == mx.float16
                    else {"weights": mma_w}))
    assert pf is not None and pb is not None and pf.mma == KIND[xdt]
    assert pb.mma == (0 if xdt == mx.float16 else KIND[xdt])
    assert pf.w_global == streamed and pb.w_global == streamed
    assert any(_plan_shows(p, what) for p in (pf, pb)), (what, pf, pb)
    got, (_, sync) = emu.forward(cell, xp, w_h, s0, params, zero, limits, plan=pf)
    assert [int(v) for v in sync.tolist()[:: P.SYNC_STRIDE]] == [pf.NU * (L - 1)] * pf.NBB
    # Each step's projection against its own previous state, both operands rounded as the
    # plan rounds them (teacher forcing: no state differs in its last bits from the one
    # the kernel rounded), and each step's cell on the kernel's own hp: float32 rounding.
    rnd = ref.mma_rounding(pf.mma)
    seqs, hp = got[:-1], got[-1]
    prevs = ref.prevs_of(s0, seqs)
    want_hp = mx.stack([mx.zeros_like(hp[0]) if t == 0 and zero else rnd(prevs[0][t]) @ rnd(w_h).T
                        for t in range(L)])
    assert ref.max_rel_err(hp, want_hp) < 2e-6
    step = ref.CELLS[cell].forward_step
    for t in range(L):
        want = step(xp[t], hp[t], tuple(p[t] for p in prevs), params, **ref.CELLS[cell].step_kwargs)
        for q, (a, e) in enumerate(zip(seqs, want)):
            assert ref.max_rel_err(a[t], e) < 2e-6, f"state {q} at step {t}"
    # The whole sequence against the rounded reference: the MMA type's rounding at most
    # (a state a last bit off rounds to the other side of a boundary now and then), and
    # without the rounding off by that precision, not more.
    expected = ref.forward(cell, xp, w_h, s0, params, zero, mma=pf.mma)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert ref.max_rel_err(a, e) < 1e-3, f"forward output {i}"
    plain = ref.forward(cell, xp, w_h, s0, params, zero)
    assert ref.max_rel_err(got[0], plain[0]) < {1: 2e-2, 2: 3e-3, 3: 3e-3}[pf.mma]

    need = not zero
    seqs, hp = expected[:-1], expected[-1]
    prevs = ref.prevs_of(s0, seqs)
    d_outs = ref.cotangents(cell, L, B, H)
    (dx, dhp, d0), _ = emu.backward(cell, d_outs, xp, hp, prevs, params, w_h, need, limits, plan=pb)
    rdx, rdhp, rd0 = ref.backward(cell, d_outs, xp, hp, prevs, params, w_h, need, mma=pb.mma)
    # The kernel rounds its own dhp of the step after, which differs from the
    # reference's in the last float32 bits, so now and then to the other side of a
    # rounding boundary (one MMA-type ulp of one product term; seen: 2.7e-6, 9e-6).
    tol = 2e-4 if pb.mma else 2e-6
    assert ref.max_rel_err(dx, rdx) < tol
    assert ref.max_rel_err(dhp, rdhp) < tol
    if need:
        for a, e in zip(d0, rd0):
            assert ref.max_rel_err(a, e) < tol


# (cell, L, B, H, x dtype, zero initial state, lengths or None, REV mask, problems, interleaved)
VARLEN_CASES = [
    ("lstm", 5, 9, 20, mx.bfloat16, False, [5, 2, 1, 5, 4, 3, 5, 1, 2], 0, 1, False),
    ("gru", 4, 8, 24, mx.float32, False, None, 0b10, 2, False),
    ("rnn_tanh", 3, 9, 16, mx.float16, True, [1, 3, 2] * 6, 0b01, 2, True),
]


@needs_cxx
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{c[0]}-np{c[8]}-rev{c[7]}-xil{int(c[9])}")
def test_emulated_mma_lengths_directions_problems(case):
    """The tensor-core kernels with per-row lengths, reversed problems, two problems
    in one launch and problem-interleaved I/O: forward against the masked reference
    with rounded operands; the backward against its vjp, which passes the rounding
    straight through (so within the MMA type's precision)."""
    cell, L, B, H, xdt, zero, lens, rev, problems, xil = case
    kind = KIND[xdt]

    def forward(*args, lens, rev, **kw):
        p = TP.plan("forward", cell, H, B, LIM, x_dtype=xdt, tpb=64, weights="mma", problems=problems)
        assert p is not None and p.mma == kind
        return emu.forward(cell, *args, LIM, plan=p, lens=lens, rev=rev, **kw)[0]

    def backward(*args, lens, rev, d_out, **kw):  # float16: the FMA backward (see the planner)
        p = TP.plan("backward", cell, H, B, LIM, x_dtype=xdt, tpb=64, problems=problems,
                    **({"mma": 0} if kind == gpu.MMA_F16 else {"weights": "mma"}))
        assert p is not None and p.mma == (0 if kind == gpu.MMA_F16 else kind)
        return emu.backward(cell, *args, LIM, plan=p, lens=lens, rev=rev, d_out=d_out, **kw)[0]

    tol_bwd = {1: 3e-2, 2: 5e-3, 3: 5e-3}[kind]
    ref.check_varlen(cell, L, B, H, xdt, zero, lens, rev, problems, forward, backward,
                     tol=(2e-6, tol_bwd), interleaved=xil, mma=kind)


@needs_cxx
def test_emulated_streamed_mma_staging_through_registers(monkeypatch):
    """The 16-byte staging of a 16-bit streamed chunk without cp.async (``ldcg_staging``:
    float4 loads and stores of the raw bits) gives the same results."""
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_SWITCHES", "ldcg_staging")
    test_emulated_mma_forward_backward(("gru", 3, 4, 64, mx.bfloat16, False, CHUNKED, "streamed W_h in K-chunks"))


SMALL12 = P.Limits(num_sms=8, smem_per_block=12 * 1024, smem_per_sm=26 * 1024, cc_major=9)
SMALL8 = P.Limits(num_sms=8, smem_per_block=8 * 1024, smem_per_sm=18 * 1024, cc_major=9)
PIPELINED_CASES = [  # cases of test_emulated_mma_forward_backward whose plans are pipelined
    ("gru", 3, 4, 64, mx.bfloat16, False, SMALL12, "pipelined"),  # the backward: a slice, K = 192 in 3 chunks
    ("slstm", 3, 17, 32, mx.bfloat16, True, SMALL8, "pipelined"),  # the backward: two K-splits, 4 chunks
    ("gru", 3, 4, 96, mx.bfloat16, False, SMALL12, "streamed W_h, pipelined"),  # K = 288: a partial last chunk
    ("lstm", 3, 6, 40, mx.float32, False, SMALL12, "streamed W_h, pipelined"),  # tf32: register staging
    ("rnn_tanh", 2, 9, 128, mx.float32, False, SMALL12, "streamed W_h, pipelined"),  # both directions
]


@needs_cxx
@pytest.mark.parametrize("case", PIPELINED_CASES, ids=_emu_id)
def test_emulated_pipelined_projection(case, monkeypatch):
    """``MLX_FASTRNN_PERSISTENT_PIPELINE=1``: tensor-core plans of several K-chunks stage
    chunk c + 1 into the other buffers while chunk c's MMAs run (``Plan.pipe``), on the
    split the unpipelined plan has (at most its K-splits: the chunk is smaller); the
    kernels pass the unpipelined kernels' checks."""
    cell, L, B, H, xdt, zero, limits, what = case
    weights = "mma_global" if what.startswith("streamed") else "mma"
    for direction in ("forward", "backward"):
        monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_PIPELINE", "0")
        q = TP.plan(direction, cell, H, B, limits, x_dtype=xdt, tpb=64, weights=weights)
        monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_PIPELINE", "1")
        p = TP.plan(direction, cell, H, B, limits, x_dtype=xdt, tpb=64, weights=weights)
        assert not q.pipe and (q.U, q.NU, q.BB, q.cost) == (p.U, p.NU, p.BB, p.cost) and p.KS <= q.KS
        assert (not p.pipe or q.KCH < q.K) and p.smem <= P.smem_budget(limits)
        assert p.pipe or p == q  # one chunk, or no pipelined chunk of 32 fits: the plan of before
        assert not p.pipe or p.KCH < p.K and p.KS <= -(-p.KCH // (8 if p.mma == gpu.MMA_TF32 else 16))
    test_emulated_mma_forward_backward(case)


HALF_ROW_CASES = [c for c in EMU_CASES if c[4] != mx.float32 and c[7] != "cluster plans"] + [
    # K % 4 != 0: the rows staged pair by pair (odd K, a partial last chunk of odd length)
    ("gru", 3, 9, 33, mx.bfloat16, False, CHUNKED, "K-chunks, odd K"),
    ("lstm", 3, 9, 42, mx.float16, True, CHUNKED, "streamed W_h in K-chunks, K % 4 == 2"),
]


@needs_cxx
@pytest.mark.parametrize("case", HALF_ROW_CASES, ids=_emu_id)
def test_emulated_half_rows(case, monkeypatch):
    """``MLX_FASTRNN_PERSISTENT_HALF_ROWS=1``: a bfloat16 / float16 tensor-core plan stages
    its rows as that type (``Plan.hrows``, ``stage_rows_half``), on the same split, in less
    shared memory; its kernels give the float32-staged kernels' numbers bit for bit (each
    value rounded once while staged, as every fragment load rounded it), forward and
    backward (a float16 backward keeps the FMA projection: no 16-bit rows there)."""
    cell, L, B, H, xdt, zero, limits, what = case
    xp, w_h, s0, params = ref.problem(cell, L, B, H, xdt)
    if zero:
        s0 = tuple(mx.zeros_like(s) for s in s0)
    nbb = 1 if what == "row-tile groups" else None
    weights = "mma_global" if what.startswith("streamed") else "mma"
    plans = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_HALF_ROWS", flag)
        plans[flag] = [TP.plan(d, cell, H, B, limits, x_dtype=xdt, tpb=64, weights=weights, nbb=nbb)
                       for d in ("forward", "backward")]
    for q, p in zip(plans["0"], plans["1"]):
        if q is None:
            assert p is None and xdt == mx.float16  # the float16 backward: no tensor-core plan
            continue
        assert not q.hrows and p.hrows and p.smem < q.smem
        assert (p.U, p.NU, p.BB, p.KS, p.KCH, p.cost, p.w_global) == (q.U, q.NU, q.BB, q.KS, q.KCH, q.cost,
                                                                        q.w_global)
    (qf, qb), (pf, pb) = plans["0"], plans["1"]
    h0_zero = zero
    want, _ = emu.forward(cell, xp, w_h, s0, params, h0_zero, limits, plan=qf)
    got, _ = emu.forward(cell, xp, w_h, s0, params, h0_zero, limits, plan=pf)
    for a, e in zip(got, want):
        assert ref.max_rel_err(a, e) == 0.0
    if pb is not None:
        seqs, hp = want[:-1], want[-1]
        prevs = ref.prevs_of(s0, seqs)
        d_outs = ref.cotangents(cell, L, B, H)
        want_b, _ = emu.backward(cell, d_outs, xp, hp, prevs, params, w_h, not zero, limits, plan=qb)
        got_b, _ = emu.backward(cell, d_outs, xp, hp, prevs, params, w_h, not zero, limits, plan=pb)
        for a, e in zip(got_b[:2], want_b[:2]):
            assert ref.max_rel_err(a, e) == 0.0
        if not zero:  # the initial states' cotangents: the projection of step -1
            for a, e in zip(got_b[2], want_b[2]):
                assert ref.max_rel_err(a, e) == 0.0


STREAMED_VARLEN_CASES = [
    ("lstm", 4, 6, 24, mx.bfloat16, False, [4, 1, 3, 2, 4, 2] * 2, 0b10, 2, True),
    ("gru", 3, 5, 32, mx.float32, True, None, 0b01, 2, False),
]


@needs_cxx
@pytest.mark.parametrize("case", STREAMED_VARLEN_CASES, ids=lambda c: f"{c[0]}-np{c[8]}-rev{c[7]}-xil{int(c[9])}")
def test_emulated_streamed_mma_lengths_directions_problems(case):
    """The streamed tensor-core kernels (each problem's rows of its own W_h staged per
    K-chunk) with lengths, reversed problems, two problems and interleaved I/O."""
    cell, L, B, H, xdt, zero, lens, rev, problems, xil = case
    kind = KIND[xdt]

    def plan(direction):
        p = TP.plan(direction, cell, H, B, CHUNKED, x_dtype=xdt, tpb=64, weights="mma_global", problems=problems)
        assert p is not None and p.mma == kind and p.w_global
        return p

    def forward(*args, lens, rev, **kw):
        return emu.forward(cell, *args, CHUNKED, plan=plan("forward"), lens=lens, rev=rev, **kw)[0]

    def backward(*args, lens, rev, d_out, **kw):
        return emu.backward(cell, *args, CHUNKED, plan=plan("backward"), lens=lens, rev=rev, d_out=d_out, **kw)[0]

    ref.check_varlen(cell, L, B, H, xdt, zero, lens, rev, problems, forward, backward,
                     tol=(2e-6, {1: 3e-2, 3: 5e-3}[kind]), interleaved=xil, mma=kind)


# --------------------------------------------------------------------------- NVRTC


def _compiles_plain_and_varlen(p, xdt):
    """NVRTC + ptxas of plan ``p``'s kernel, and with several problems also its varlen
    form (lengths, the second problem reversed, interleaved I/O)."""
    from test_persistent_cpu import _assert_compiles

    _assert_compiles(p, xdt)
    if p.NP > 1:
        _assert_compiles(p, xdt, lens=True, rev=0b10, interleaved=True)


@needs_nvrtc
@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_nvrtc_compiles_mma_without_spills(cell, direction):
    for (B, H, NP), xdt in (((64, 256, 4), mx.float32), ((64, 256, 4), mx.bfloat16), ((16, 128, 1), mx.float16),
                            ((256, 128, 1), mx.bfloat16)):
        p = TP.plan(direction, cell, H, B, H200, x_dtype=xdt, weights="mma", problems=NP)
        if xdt == mx.float16 and direction == "backward":
            assert p is None  # the FMA backward (the planner's float16 rule)
            continue
        assert p is not None and p.mma == KIND[xdt]
        _compiles_plain_and_varlen(p, xdt)


@needs_nvrtc
@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_nvrtc_compiles_streamed_mma(cell, direction):
    """The streamed tensor-core kernels of H200 plans (H = 1024-2048), plain and as
    two problems with lengths, directions and interleaved I/O."""
    for (B, H, NP), xdt in (((128, 1024, 1), mx.bfloat16), ((128, 1024, 1), mx.float32), ((8, 2048, 1), mx.bfloat16),
                            ((16, 1024, 2), mx.bfloat16), ((4, 1024, 1), mx.float16)):
        p = TP.plan(direction, cell, H, B, H200, x_dtype=xdt, weights="mma_global", problems=NP)
        if xdt == mx.float16 and direction == "backward":
            assert p is None  # the FMA backward (the planner's float16 rule)
            continue
        if p is None and cell == "slstm" and direction == "backward" and B == 128:
            continue  # 2 elements a thread at most (MAX_EPT_BACKWARD): B = 128 needs 4
        assert p is not None and p.mma == KIND[xdt] and p.w_global
        _compiles_plain_and_varlen(p, xdt)


@needs_nvrtc
@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_nvrtc_compiles_pipelined_mma(cell, direction, monkeypatch):
    """The pipelined tensor-core kernels (``MLX_FASTRNN_PERSISTENT_PIPELINE=1``) of H200
    plans, streamed and slice, plain and as two problems with lengths and directions."""
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_PIPELINE", "1")
    compiled = 0
    for (B, H, NP), xdt, weights in (((8, 1024, 1), mx.float32, "mma_global"), ((128, 1024, 1), mx.bfloat16,
                                     "mma_global"), ((64, 256, 4), mx.float32, "mma"), ((16, 512, 2), mx.bfloat16,
                                     "mma_global")):
        p = TP.plan(direction, cell, H, B, H200, x_dtype=xdt, weights=weights, problems=NP)
        if p is None or not p.pipe:
            continue
        _compiles_plain_and_varlen(p, xdt)
        compiled += 1
    assert compiled  # every cell and direction has a pipelined plan among these shapes


@needs_nvrtc
@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_nvrtc_compiles_half_rows(cell, direction, monkeypatch):
    """The 16-bit staged rows (``MLX_FASTRNN_PERSISTENT_HALF_ROWS=1``) of H200 plans,
    streamed and slice, bfloat16 and float16, plain and as two problems with lengths,
    directions and interleaved I/O."""
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_HALF_ROWS", "1")
    compiled = 0
    for (B, H, NP), xdt, weights in (((128, 1024, 1), mx.bfloat16, "mma_global"), ((64, 256, 4), mx.bfloat16, "mma"),
                                     ((16, 1024, 2), mx.bfloat16, "mma_global"), ((16, 128, 1), mx.float16, "mma")):
        p = TP.plan(direction, cell, H, B, H200, x_dtype=xdt, weights=weights, problems=NP)
        if p is None:
            continue
        assert p.hrows
        _compiles_plain_and_varlen(p, xdt)
        compiled += 1
    assert compiled


def test_half_rows_never_with_the_pipelined_form(monkeypatch):
    """Both opt-in forms switched on: a plan of several K-chunks takes the pipelined form
    and stages float32 rows (the kernel's static_assert rules out ``pipe`` with ``hrows``);
    a bfloat16 / float16 plan of one chunk stages 16-bit rows; a float32 (tf32) plan never."""
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_PIPELINE", "1")
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_HALF_ROWS", "1")
    seen = set()
    for cell in ref.CELL_NAMES:
        for direction in ("forward", "backward"):
            for (B, H), weights in (((128, 1024), "mma_global"), ((8, 2048), "mma_global"), ((64, 256), "mma"),
                                    ((16, 128), "mma")):
                for xdt in (mx.float32, mx.bfloat16, mx.float16):
                    p = TP.plan(direction, cell, H, B, H200, x_dtype=xdt, weights=weights)
                    if p is None or not p.mma:
                        continue
                    assert not (p.pipe and p.hrows), p
                    if xdt == mx.float32:
                        assert not p.hrows, p
                    else:
                        assert p.hrows == (not p.pipe), p
                    seen.add((p.pipe, p.hrows))
    assert seen >= {(True, False), (False, True)}  # both forms among these plans
