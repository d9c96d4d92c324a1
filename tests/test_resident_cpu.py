"""The resident (latency-class) CUDA kernels, checked without a GPU: planning in
pure Python, the exact kernel sources run by the CPU emulator against the cells'
reference steps (skipped without a C++20 compiler), NVRTC compiles (skipped
unless MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS are set)."""

import dataclasses

import pytest

import mlx.core as mx

import persistent_emulator as emu
import persistent_reference as ref
from mlx_fastrnn.kernels import persistent as P
from mlx_fastrnn.kernels import resident as R

H100 = P.Limits(num_sms=132, smem_per_block=232448, smem_per_sm=233472)
SMALL = P.Limits(num_sms=6, smem_per_block=48 * 1024, smem_per_sm=100 * 1024)
needs_cxx = pytest.mark.skipif(emu.host_compiler() is None, reason="no C++20 host compiler")


def test_plan_fits_one_block_or_declines():
    for cell in ref.CELL_NAMES:
        G = P.CELLS[cell].num_gates
        for direction in ("forward", "backward"):
            for H in (1, 31, 64, 100, 128, 200, 256, 400):
                for B in (1, 7, 64):
                    p = R.plan(direction, cell, H, B, H100)
                    if p is None:
                        # declined only when even one row's W_h does not fit
                        assert R.smem_bytes(direction, G, H, 1, 4) > H100.smem_per_block
                        continue
                    assert p.smem == R.smem_bytes(direction, G, H, p.BB, 4) <= H100.smem_per_block
                    assert p.NBB * p.BB >= B > (p.NBB - 1) * p.BB
                    assert p.RS * p.RPT >= p.BB and p.TPB % 32 == 0 and p.TPB <= R.MAX_TPB
                    assert p.TPB // p.RS >= H
    # 16-bit weights (the input's type) only for half inputs, and only when float32 does not fit
    assert R.plan("forward", "lstm", 128, 8, H100) is None
    for xdt in (mx.bfloat16, mx.float16):
        p = R.plan("forward", "lstm", 128, 8, H100, xdt)
        assert p is not None and p.w_half and p.w_dtype == xdt
        assert R.plan("forward", "lstm", 64, 8, H100, xdt).w_dtype == mx.float32


CASES = [
    # cell, L, B, H, x dtype, zero initial state, forced rows per block
    ("gru", 5, 3, 20, mx.float32, False, None),
    ("gru", 4, 5, 33, mx.bfloat16, True, 2),
    ("lstm", 4, 3, 17, mx.float32, False, None),
    ("lstm", 3, 6, 8, mx.float16, True, 4),
    ("rnn_tanh", 6, 2, 40, mx.float32, False, None),
    ("rnn_relu", 5, 3, 9, mx.float32, True, 2),
    ("slstm", 4, 3, 12, mx.float32, False, None),
    ("slstm", 3, 2, 6, mx.bfloat16, True, 2),
]


@needs_cxx
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-L{c[1]}-B{c[2]}-H{c[3]}-{c[4]}-{c[5]}-{c[6]}")
def test_emulated_resident_forward_backward(case):
    cell, L, B, H, xdt, zero, rows = case
    pf = R.plan("forward", cell, H, B, SMALL, xdt, 1, rows)
    pb = R.plan("backward", cell, H, B, SMALL, xdt, 1, rows)
    assert pf is not None and pb is not None
    _check_plans(cell, L, B, H, xdt, zero, pf, pb)


def _check_plans(cell, L, B, H, xdt, zero, pf, pb):
    """Forward plan ``pf`` and backward plan ``pb``, emulated, against the reference."""
    xp, w_h, s0, params = ref.problem(cell, L, B, H, xdt)
    if zero:
        s0 = tuple(mx.zeros_like(s) for s in s0)
    # the reference on the W_h each kernel reads (rounded where it holds a 16-bit copy)
    expected = ref.forward(cell, xp, w_h.astype(pf.w_dtype).astype(mx.float32), s0, params, zero)
    got, _ = emu.resident_forward(cell, xp, w_h, s0, params, zero, SMALL, plan=pf)
    for a, e in zip(got, expected):
        assert ref.max_rel_err(a, e) < 2e-6
    need = not zero
    seqs, hp = expected[:-1], expected[-1]
    prevs = ref.prevs_of(s0, seqs)
    d_outs = ref.cotangents(cell, L, B, H)
    (dx, dhp, d0), _ = emu.resident_backward(cell, d_outs, xp, hp, prevs, params, w_h, need, SMALL, plan=pb)
    rdx, rdhp, rd0 = ref.backward(cell, d_outs, xp, hp, prevs, params, w_h.astype(pb.w_dtype).astype(mx.float32),
                                  need)
    assert ref.max_rel_err(dx, rdx) < 2e-6
    assert ref.max_rel_err(dhp, rdhp) < 2e-6
    if need:
        for a, e in zip(d0, rd0):
            assert ref.max_rel_err(a, e) < 2e-6
    else:
        assert d0 is None


@needs_cxx
@pytest.mark.parametrize("cell,H", [("lstm", 16), ("gru", 20)])
@pytest.mark.parametrize("xdt", [mx.bfloat16, mx.float16], ids=["bf16", "f16"])
def test_emulated_resident_half_weights(cell, H, xdt):
    """Where a float32 W_h does not fit the block, a half input's is held in its own
    16-bit type (float16: a float16 layer's weights exactly), forward and backward."""
    tiny = P.Limits(num_sms=6, smem_per_block=4000, smem_per_sm=8000)
    L, B = 4, 3
    assert R.plan("forward", cell, H, B, tiny, mx.float32) is None
    pf = R.plan("forward", cell, H, B, tiny, xdt)
    pb = R.plan("backward", cell, H, B, tiny, xdt)
    assert pf.w_dtype == pb.w_dtype == xdt
    _check_plans(cell, L, B, H, xdt, False, pf, pb)


@needs_cxx
@pytest.mark.parametrize("cell", ["gru", "lstm", "slstm"])
def test_emulated_resident_problems_are_independent(cell):
    """Three problems (heads, or directions) in one launch: each its own W_h,
    parameters and rows, equal to the problem run alone."""
    L, B, H, n = 4, 2, 10, 3
    parts = [ref.problem(cell, L, B, H, mx.float32, seed=20 + k) for k in range(n)]
    xp = mx.concatenate([p[0] for p in parts], axis=1)
    w = mx.stack([p[1] for p in parts])
    s0 = tuple(mx.concatenate(ss, axis=0) for ss in zip(*(p[2] for p in parts)))
    params = tuple(mx.stack(qs) for qs in zip(*(p[3] for p in parts)))
    got, p = emu.resident_forward(cell, xp, w, s0, params, False, SMALL)
    assert p.NP == n
    expected = [ref.forward(cell, *part, False) for part in parts]
    for i, a in enumerate(got):
        assert ref.max_rel_err(a, mx.concatenate([e[i] for e in expected], axis=1)) < 2e-6
    seqs, hp = got[:-1], got[-1]
    prevs = ref.prevs_of(s0, seqs)
    d_outs = ref.cotangents(cell, L, n * B, H)
    got, _ = emu.resident_backward(cell, d_outs, xp, hp, prevs, params, w, True, SMALL)
    ref.check_problems_backward(cell, parts, got, d_outs, hp, prevs, True, 2e-6)


# (cell, L, B, H, x dtype, zero initial state, lengths or None, REV mask, problems, rows per block)
VARLEN_CASES = [
    ("lstm", 5, 3, 20, mx.float32, False, [5, 2, 1], 0, 1, None),
    ("gru", 4, 3, 17, mx.float32, False, None, 1, 1, None),
    ("gru", 6, 4, 24, mx.bfloat16, False, [6, 3, 1, 4], 1, 1, 2),
    ("rnn_tanh", 5, 3, 9, mx.float32, True, [2, 5, 3], 1, 1, None),
    ("rnn_relu", 4, 2, 11, mx.float32, False, [1, 4], 0, 1, 1),
    ("slstm", 5, 3, 12, mx.float32, False, [4, 1, 5], 1, 1, None),
    ("lstm", 4, 2, 12, mx.float16, True, [3, 4, 4, 1], 2, 2, None),
    ("gru", 5, 3, 10, mx.float32, False, [5, 2, 1, 3, 5, 4], 2, 2, 2),
    ("slstm", 4, 2, 9, mx.float32, False, [2, 4, 4, 3], 2, 2, None),
]


@needs_cxx
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{c[0]}-L{c[1]}-B{c[2]}-H{c[3]}-{c[4]}-{c[5]}"
                         f"-{'lens' if c[6] else 'full'}-rev{c[7]}-np{c[8]}-rows{c[9]}")
def test_emulated_resident_lengths_and_directions(case):
    """Per-row lengths and per-problem directions inside the resident kernels
    (``ref.check_varlen``: forward against a masked MLX reference, backward
    against its ``mx.vjp``)."""
    cell, L, B, H, xdt, zero, lens, rev, problems, rows = case
    pf = R.plan("forward", cell, H, B, SMALL, xdt, problems, rows)
    pb = R.plan("backward", cell, H, B, SMALL, xdt, problems, rows)
    assert pf is not None and pb is not None
    _check_varlen_plans(cell, L, B, H, xdt, zero, lens, rev, problems, pf, pb)


def _check_varlen_plans(cell, L, B, H, xdt, zero, lens, rev, problems, pf, pb, interleaved=False):
    """``ref.check_varlen`` of plans ``pf`` / ``pb``, emulated."""
    def forward(*args, lens, rev, **kw):
        return emu.resident_forward(cell, *args, SMALL, plan=pf, lens=lens, rev=rev, **kw)[0]

    def backward(*args, lens, rev, d_out, **kw):
        return emu.resident_backward(cell, *args, SMALL, plan=pb, lens=lens, rev=rev, d_out=d_out, **kw)[0]

    ref.check_varlen(cell, L, B, H, xdt, zero, lens, rev, problems, forward, backward, interleaved=interleaved)


@needs_cxx
@pytest.mark.parametrize("cell,L,B,H,xdt,lens,rev,problems,rows", [
    ("lstm", 4, 3, 12, mx.float32, [4, 1, 3, 2, 4, 4], 0b10, 2, 2),
    ("gru", 5, 2, 10, mx.bfloat16, None, 0b10, 2, None),
    ("rnn_relu", 3, 2, 8, mx.float32, [3, 1, 2, 3, 2, 2], 0b110, 3, 1),
])
def test_emulated_resident_problem_interleaved_io(cell, L, B, H, xdt, lens, rev, problems, rows):
    """``XIL`` in the resident kernels: x, out, dx and the out cotangent
    problem-interleaved, against the masked reference and its vjp."""
    pf = R.plan("forward", cell, H, B, SMALL, xdt, problems, rows)
    pb = R.plan("backward", cell, H, B, SMALL, xdt, problems, rows)
    assert pf is not None and pb is not None
    _check_varlen_plans(cell, L, B, H, xdt, False, lens, rev, problems, pf, pb, interleaved=True)


@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("varlen", [False, True])
def test_nvrtc_compiles_without_spills(cell, direction, varlen):
    for (B, H), xdt in (((1, 64), mx.float32), ((16, 100), mx.bfloat16), ((64, 32), mx.float32)):
        p = R.plan(direction, cell, H, B, H100, xdt, 2 if varlen else 1)
        for xil in (False, True) if varlen else (False,):  # problem-major / -interleaved x, out, dx
            spec = R.kernel_spec(p, xdt, True, lens=varlen, rev=0b10 if varlen else 0, interleaved=xil)
            ok, log, (regs, spill_st, spill_ld, stack) = emu.compile_spec(spec, xdt, p.w_dtype)
            assert ok, log[-4000:]
            assert spill_st == 0 and spill_ld == 0 and stack == 0, log


def test_only_the_plain_kernels_skip_the_output_zeroing():
    """The plain resident kernels write every output element that is read, so they
    are launched without MLX's zero fill of each output (the emulator then fills
    them with NaN bytes, and the forward / backward tests above still match the
    reference); the varlen kernels (zeros past each length, frozen steps' dhp) keep
    the zeroing, and so does the tiled class (its barrier counters start at zero)."""
    for direction in ("forward", "backward"):
        rp = R.plan(direction, "lstm", 32, 4, H100)
        assert not R.kernel_spec(rp, mx.float32, True).zero_outputs
        assert R.kernel_spec(rp, mx.float32, True, lens=True).zero_outputs
        assert R.kernel_spec(rp, mx.float32, True, rev=1).zero_outputs
        assert P.kernel_spec(P.plan(direction, "lstm", 32, 4, H100), mx.float32, True).zero_outputs


# (cell, L, B, H, x dtype, zero initial state, rows per block, threads per unit)
K_SPLIT_CASES = [
    ("lstm", 4, 3, 20, mx.float32, False, None, 2),
    ("gru", 3, 2, 17, mx.float32, True, None, 4),
    ("rnn_tanh", 3, 5, 40, mx.float32, False, 2, 8),
    ("slstm", 3, 2, 12, mx.bfloat16, False, None, 4),
    ("lstm", 5, 4, 33, mx.float16, True, 2, 8),
]


@needs_cxx
@pytest.mark.parametrize("case", K_SPLIT_CASES, ids=lambda c: f"{c[0]}-B{c[2]}-H{c[3]}-{c[4]}-ksp{c[7]}")
def test_emulated_resident_k_split(case):
    """The projection split over KSP threads per unit (interleaved float4 chunks,
    warp-shuffle sums), forward and backward: the same results as the reference,
    plain and with lengths / a reversed second problem."""
    cell, L, B, H, xdt, zero, rows, ksp = case
    pf = R.plan("forward", cell, H, B, SMALL, xdt, 1, rows, ksp=ksp)
    pb = R.plan("backward", cell, H, B, SMALL, xdt, 1, rows, ksp=ksp)
    assert pf is not None and pf.KSP == ksp and pf.TPB % (32 * ksp) == 0
    assert pb is not None and pb.KSP == ksp
    _check_plans(cell, L, B, H, xdt, zero, pf, pb)
    pf = R.plan("forward", cell, H, B, SMALL, xdt, 2, rows, ksp=ksp)
    pb = R.plan("backward", cell, H, B, SMALL, xdt, 2, rows, ksp=ksp)
    lens = [max(1, (3 * r) % (L + 1)) for r in range(2 * B)]
    _check_varlen_plans(cell, L, B, H, xdt, zero, lens, 0b10, 2, pf, pb)


def test_k_split_is_bounded():
    with pytest.raises(ValueError, match="ksp"):
        R.plan("forward", "lstm", 32, 2, H100, ksp=3)
    assert R.plan("forward", "lstm", 32, 2, H100, ksp=8).TPB <= R.MAX_TPB
    assert R.plan("forward", "lstm", 256, 2, H100, x_dtype=mx.bfloat16, ksp=8) is None  # 256*8 threads > 1024


@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("ksp", [2, 4, 8])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_nvrtc_compiles_the_k_split_without_spills(cell, ksp, direction):
    for (B, H), xdt in (((1, 64), mx.float32), ((8, 128), mx.float32), ((16, 100), mx.bfloat16)):
        p = R.plan(direction, cell, H, B, H100, xdt, ksp=ksp)
        if p is None:  # W_h does not fit one block (LSTM / sLSTM float32 H=128) or too many threads
            continue
        spec = R.kernel_spec(p, xdt, True)
        ok, log, (regs, spill_st, spill_ld, stack) = emu.compile_spec(spec, xdt, p.w_dtype)
        assert ok, log[-4000:]
        assert spill_st == 0 and spill_ld == 0 and stack == 0, log


# (cell, L, B, H, x dtype, zero initial state, rows per block, threads per unit): KSP
# dividing K/4 and not (a thread with one chunk fewer), H not a multiple of 4
W_REGISTER_CASES = [
    ("lstm", 4, 3, 20, mx.float32, False, None, 2),
    ("gru", 3, 2, 17, mx.float32, True, 2, 4),
    ("rnn_tanh", 3, 5, 24, mx.float32, False, 2, 1),
    ("slstm", 3, 2, 12, mx.bfloat16, False, None, 4),
    ("lstm", 5, 4, 9, mx.float16, True, 2, 2),
]


@needs_cxx
@pytest.mark.parametrize("case", W_REGISTER_CASES, ids=lambda c: f"{c[0]}-B{c[2]}-H{c[3]}-{c[4]}-ksp{c[7]}")
def test_emulated_resident_w_in_registers(case, monkeypatch):
    """``WREG``: each thread's share of W_h in registers, forward and backward: the
    same results as the reference, plain and with lengths / a reversed second
    problem."""
    cell, L, B, H, xdt, zero, rows, ksp = case
    monkeypatch.setenv("MLX_FASTRNN_RESIDENT_WREG", "1")

    def plans(problems):
        pf, pb = (R.with_registers(R.plan(d, cell, H, B, SMALL, xdt, problems, rows, ksp=ksp), SMALL)
                  for d in ("forward", "backward"))
        assert pf.WREG and pb.WREG
        return pf, pb

    _check_plans(cell, L, B, H, xdt, zero, *plans(1))
    lens = [max(1, (3 * r) % (L + 1)) for r in range(2 * B)]
    _check_varlen_plans(cell, L, B, H, xdt, zero, lens, 0b10, 2, *plans(2))


@needs_cxx
@pytest.mark.parametrize("cell,H,ksp,xdt", [("lstm", 20, 2, mx.float32), ("gru", 17, 4, mx.bfloat16),
                                          ("slstm", 12, 8, mx.float32), ("rnn_tanh", 24, 1, mx.float16)])
def test_emulated_w_in_registers_is_bit_identical(cell, H, ksp, xdt):
    """The register and shared-memory projections take the same chunks in the same
    order: the emulated outputs and cotangents are bit for bit the same."""
    L, B = 4, 3
    xp, w_h, s0, params = ref.problem(cell, L, B, H, xdt)
    d_outs = ref.cotangents(cell, L, B, H)
    runs = []
    for wreg in (False, True):
        pf, pb = (dataclasses.replace(R.plan(d, cell, H, B, SMALL, xdt, 1, ksp=ksp), WREG=wreg)
                  for d in ("forward", "backward"))
        got, _ = emu.resident_forward(cell, xp, w_h, s0, params, False, SMALL, plan=pf)
        seqs, hp = got[:-1], got[-1]
        back, _ = emu.resident_backward(cell, d_outs, xp, hp, ref.prevs_of(s0, seqs), params, w_h, True,
                                        SMALL, plan=pb)
        runs.append([*got, back[0], back[1], *back[2]])
    for a, b in zip(*runs):
        assert mx.array_equal(a, b).item()


def test_w_registers_only_where_switched_on_and_they_fit(monkeypatch):
    """``with_registers``: where the thread's share (G*4 per forward chunk of H, 4 per
    backward chunk of G*H, every KSP-th chunk) fits ``WREG_MAX_FLOATS``, the block has
    at most ``WREG_MAX_TPB`` threads and ``register_estimate`` (the share and the
    kernel's other registers, more with more rows a thread) fits 255 and the register
    file; by default and with ``MLX_FASTRNN_RESIDENT_WREG=1``, never with ``=0``."""
    small = R.plan("forward", "lstm", 16, 4, H100, ksp=1)  # 4 chunks x 4 gates x 4 = 64 floats
    monkeypatch.delenv("MLX_FASTRNN_RESIDENT_WREG", raising=False)
    assert not small.WREG and R.with_registers(small, H100).WREG
    monkeypatch.setenv("MLX_FASTRNN_RESIDENT_WREG", "1")
    assert R.register_floats(small) == 64 and R.with_registers(small, H100).WREG
    big = R.plan("forward", "lstm", 64, 4, H100, ksp=1)  # 16 chunks x 16 = 256
    assert R.register_floats(big) == 256 and not R.with_registers(big, H100).WREG
    assert R.with_registers(R.plan("forward", "lstm", 64, 4, H100, ksp=2), H100).WREG  # 128
    back = R.plan("backward", "lstm", 32, 4, H100, ksp=4)  # K = 128: 32 chunks / 4 x 4 = 32
    assert R.register_floats(back) == 32 and R.with_registers(back, H100).WREG
    # more threads than WREG_MAX_TPB
    crowded = dataclasses.replace(small, TPB=1024)
    assert not R.with_registers(crowded, H100).WREG
    assert not R.with_registers(dataclasses.replace(back, TPB=512), H100).WREG  # more than WREG_MAX_TPB
    # the RNN's 96 floats at 384 threads (178 registers measured): more than WREG_MAX_TPB
    rows4 = R.plan("forward", "rnn_tanh", 96, 16, H100, mx.float32, 1, 16, 4)
    assert rows4.RPT == 4 and rows4.TPB == 384 and not R.with_registers(rows4, H100).WREG
    # the estimate alone: 128 floats at four rows a thread in a block of 128 threads
    lstm4 = R.plan("backward", "lstm", 64, 16, H100, mx.float32, 1, 4, 4, ksp=2)
    assert lstm4.TPB <= R.WREG_MAX_TPB and R.register_estimate(lstm4) > 255
    assert not R.with_registers(lstm4, H100).WREG
    # more blocks than SMs: none (blocks may share an SM; more registers, fewer of them)
    assert not R.with_registers(dataclasses.replace(small, NBB=H100.num_sms + 1), H100).WREG
    monkeypatch.setenv("MLX_FASTRNN_RESIDENT_WREG", "0")
    assert not R.with_registers(small, H100).WREG


@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_nvrtc_compiles_w_in_registers_without_spills(cell, direction, monkeypatch):
    monkeypatch.setenv("MLX_FASTRNN_RESIDENT_WREG", "1")
    compiled = 0
    for (B, H), xdt, ksp in (((1, 64), mx.float32, 4), ((8, 64), mx.float32, 2), ((64, 32), mx.bfloat16, 4),
                             ((16, 16), mx.float32, 1), ((8, 128), mx.float32, 2), ((64, 64), mx.bfloat16, 2)):
        p = R.with_registers(R.plan(direction, cell, H, B, H100, xdt, ksp=ksp), H100)
        if p is None or not p.WREG:
            continue
        spec = R.kernel_spec(p, xdt, True)
        ok, log, (regs, spill_st, spill_ld, stack) = emu.compile_spec(spec, xdt, p.w_dtype)
        assert ok, log[-4000:]
        assert spill_st == 0 and spill_ld == 0 and stack == 0, log
        assert regs <= R.register_estimate(p) and _launchable(regs, p.TPB), (regs, p)
        compiled += 1
    assert compiled >= 2


def test_plans_fit_their_registers():
    """``registers_fit``: the kernel's registers (``base_register_estimate``, more
    with more rows a thread, gates and states; with ``WREG`` ``register_estimate``)
    within what a thread of its block may take. ``plan`` prefers such candidates; a
    forced split is returned as asked."""
    one = R.plan("backward", "slstm", 128, 64, H100, mx.bfloat16, 16, 8, 1)  # 1024 threads: 64 each
    assert one.TPB == 1024 and R.base_register_estimate(one) > 64 and not R.registers_fit(one, H100)
    fit = R.plan("backward", "slstm", 128, 64, H100, mx.bfloat16, 16, 8)
    assert fit.BB == 8 and R.registers_fit(fit, H100) and fit.TPB < 1024
    lstm = R.plan("backward", "lstm", 128, 64, H100, mx.bfloat16, 16, 8, 1)
    assert lstm.TPB == 1024 and R.registers_fit(lstm, H100)  # 64: its 56-58 measured fit
    four = dataclasses.replace(lstm, RPT=4)
    assert R.base_register_estimate(four) > R.base_register_estimate(lstm)


@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
@pytest.mark.parametrize("cell,direction,H,B,NP,rows,xdt", [
    ("slstm", "backward", 128, 64, 16, 8, mx.bfloat16),  # 16 heads of 128 grown to one block per SM
    ("slstm", "backward", 128, 256, 4, 8, mx.bfloat16),
    ("lstm", "backward", 128, 64, 16, 8, mx.bfloat16),
    ("lstm", "forward", 128, 64, 16, 8, mx.float16),  # W_h as float16
    ("gru", "backward", 64, 16, 1, 16, mx.float32),
])
def test_nvrtc_register_fitting_plans_do_not_spill(cell, direction, H, B, NP, rows, xdt):
    """The plans ``registers_fit`` passes compile within their block's registers
    without spilling, and within the estimate (NVRTC 13.0)."""
    p = R.plan(direction, cell, H, B, H100, xdt, NP, rows)
    assert p is not None and R.registers_fit(p, H100)
    ok, log, (regs, spill_st, spill_ld, stack) = emu.compile_spec(R.kernel_spec(p, xdt, True), xdt, p.w_dtype)
    assert ok, log[-4000:]
    assert spill_st == 0 and spill_ld == 0 and stack == 0, log
    assert regs <= R.base_register_estimate(p) and _launchable(regs, p.TPB), (regs, p)


def _launchable(regs, tpb):
    """Registers (allocated 8 a thread at a time) times threads within the SM's file."""
    return -(-regs // 8) * 8 * tpb <= H100.regs_per_sm


@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
@pytest.mark.parametrize("cell", ["lstm", "slstm", "gru"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_nvrtc_large_blocks_stay_launchable(cell, direction):
    """``__launch_bounds__(TPB, 1)``: four rows a thread in blocks of 512-1024 threads
    (without the bound 128-206 registers a thread: a block the GPU would refuse) are
    compiled within the registers the block may take."""
    for rows, ksp in ((16, 2), (16, 4)):
        p = R.plan(direction, cell, 64, 16, H100, mx.float32, 1, rows, 4, ksp=ksp)
        assert p is not None and p.RPT == 4 and p.TPB >= 512
        ok, log, (regs, *_) = emu.compile_spec(R.kernel_spec(p, mx.float32, True), mx.float32, p.w_dtype)
        assert ok, log[-4000:]
        assert _launchable(regs, p.TPB), (regs, p)
