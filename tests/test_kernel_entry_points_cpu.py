"""The whole-sequence kernels' Python entry points, run on the CPU: the launch
(``cuda_source.launch``, as imported by each class) replaced by the CPU
emulator and the device limits by a small fake GPU, so the code that only runs
on CUDA (``classes.sequence`` / ``backward``, ``persistent_sequence`` /
``persistent_backward``, ``resident.run_forward`` / ``run_backward``) is
exercised in every CI run, lengths and directions included."""

import dataclasses

import pytest

import mlx.core as mx

import persistent_emulator as emu
import persistent_reference as ref
from mlx_fastrnn.kernels import classes as C
from mlx_fastrnn.kernels import persistent as P
from mlx_fastrnn.kernels import resident as R

SMALL = P.Limits(num_sms=6, smem_per_block=48 * 1024, smem_per_sm=100 * 1024)

pytestmark = pytest.mark.skipif(emu.host_compiler() is None, reason="no C++20 host compiler")


@pytest.fixture
def emulated_gpu(monkeypatch):
    launched = []

    def launch(spec, inputs, output_shapes, output_dtypes):
        launched.append(spec.name)
        return emu.emulate(spec, list(inputs), list(zip(output_shapes, output_dtypes)))

    monkeypatch.setattr(P, "launch", launch)
    monkeypatch.setattr(R, "launch", launch)
    monkeypatch.setattr(P, "cuda_available", lambda: True)
    monkeypatch.setattr(P, "device_limits", lambda: SMALL)
    monkeypatch.delenv("MLX_FASTRNN_KERNEL_CLASS", raising=False)
    return launched


@pytest.mark.parametrize("klass", ["resident", "tiled"])
@pytest.mark.parametrize("cell,lens,rev,problems", [
    ("lstm", None, 0, 1),
    ("gru", [4, 1, 3], 1, 1),
    ("rnn_tanh", None, 1, 1),
    ("slstm", [2, 4, 4, 1], 0b10, 2),
])
def test_class_entry_points(emulated_gpu, monkeypatch, klass, cell, lens, rev, problems):
    """``classes.sequence`` / ``classes.backward`` on each class (forced), with and
    without lengths / directions, against the masked reference and its vjp."""
    monkeypatch.setenv("MLX_FASTRNN_KERNEL_CLASS", klass)
    L, B, H = 4, 3 if problems == 1 else 2, 12

    def forward(xp, w, s0, params, zero, lens, rev):
        assert C.choose("forward", cell, xp, w, lens is not None or bool(rev))[0] == klass
        if lens is None and not rev:  # the plain launch: state sequences and hp, then out = h
            seqs = C.sequence(cell, xp, w, s0, params, zero)
            return (*seqs, seqs[0])
        return C.sequence(cell, xp, w, s0, params, zero, lens=lens, rev=rev)

    def backward(d_outs, xp, hp, prevs, params, w, need, lens, rev, d_out):
        if lens is None and not rev:
            d_outs = (d_outs[0] + d_out, *d_outs[1:])
            return C.backward(cell, d_outs, xp, hp, prevs, params, w, need)
        return C.backward(cell, d_outs, xp, hp, prevs, params, w, need, lens=lens, rev=rev, d_out=d_out)

    ref.check_varlen(cell, L, B, H, mx.float32, False, lens, rev, problems, forward, backward)
    prefix = "frnn_res_" if klass == "resident" else "frnn_"
    assert len(emulated_gpu) == 2 and all(n.startswith(prefix) for n in emulated_gpu)
    assert klass == "resident" or not any(n.startswith("frnn_res_") for n in emulated_gpu)


def test_accepts_follows_the_multi_problem_rule(emulated_gpu, monkeypatch):
    """Two stacked problems on the tiled class: directions taken by default
    (float32 and bfloat16) where one launch pays over the length; heads at any
    length; the env var overrides."""
    monkeypatch.setenv("MLX_FASTRNN_KERNEL_CLASS", "tiled")
    monkeypatch.delenv("MLX_FASTRNN_PERSISTENT_PROBLEMS", raising=False)
    w = mx.zeros((2, 4 * 12, 12))
    x32, x16 = mx.zeros((1, 4, 48)), mx.zeros((1, 4, 48), mx.bfloat16)
    assert C.accepts("lstm", x32, w, varlen=True) and C.accepts("lstm", x32, w)
    assert C.accepts("lstm", x16, w, varlen=True) and C.accepts("lstm", x16, w)
    assert C.accepts("lstm", x16, w, kind="heads") and C.accepts("lstm", x32, w, kind="heads")
    # directions: only where one launch pays over the sequence (the model's extra cycles per
    # step times L against a launch's cost); heads whatever the length
    one, two = (P.plan(d, "lstm", 12, 2, SMALL, problems=n) for d, n in (("forward", 1), ("forward", 2)))
    back = [P.plan("backward", "lstm", 12, 2, SMALL, problems=n).cost for n in (1, 2)]
    extra = max(two.cost - one.cost, back[1] - back[0])
    assert extra > 0
    long_l = C.LAUNCH_COST_CYCLES // int(extra) + 1
    x_long = mx.zeros((long_l, 4, 48))  # never evaluated: the planner reads shapes
    assert C.accepts("lstm", mx.zeros((max(1, long_l // 2), 4, 48)), w, varlen=True)
    assert not C.accepts("lstm", x_long, w, varlen=True)
    assert C.accepts("lstm", x_long, w, kind="heads")
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_PROBLEMS", "1")
    assert C.accepts("lstm", x16, w, varlen=True) and C.accepts("lstm", x16, w)
    assert C.accepts("lstm", x_long, w, varlen=True)
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_PROBLEMS", "0")
    assert not C.accepts("lstm", x32, w, varlen=True) and not C.accepts("lstm", x32, w, kind="heads")


@pytest.mark.parametrize("klass", ["resident", "tiled"])
@pytest.mark.parametrize("cls_name,kw", [("LSTM", dict(num_layers=2)), ("GRU", dict())])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_pytorch_layer_on_the_default_cuda_path(emulated_gpu, monkeypatch, klass, cls_name, kw, with_lengths):
    """A float32 bidirectional ``mlx_fastrnn.pytorch`` layer on the CUDA path as
    dispatched by default (``classes.accepts``: both directions as one
    two-problem launch, the second reversed in the kernel; on the tiled class by
    the default of ``tiled_select.multi_problem_enabled``), kernels
    emulated: outputs, final states and every gradient equal the CPU path's."""
    import mlx_fastrnn.pytorch as ptl
    from mlx.utils import tree_flatten
    from mlx_fastrnn.pytorch import layers as torch_layers

    monkeypatch.delenv("MLX_FASTRNN_PERSISTENT_PROBLEMS", raising=False)
    monkeypatch.setenv("MLX_FASTRNN_KERNEL_CLASS", klass)
    L, B, I, H = 5, 3, 4, 12
    mx.random.seed(0)
    layer = getattr(ptl, cls_name)(I, H, bidirectional=True, **kw)
    x = mx.random.normal((L, B, I), key=mx.random.key(1))
    lengths = mx.array([5, 2, 4]) if with_lengths else None

    def run():
        def loss(params, x):
            layer.update(params)
            out, st = layer(x, None, lengths)
            states = st if isinstance(st, tuple) else (st,)
            w = mx.random.normal(out.shape, key=mx.random.key(9))
            return (out * w).sum() + sum((s ** 2).sum() for s in states), (out, *states)

        (value, outs), grads = mx.value_and_grad(loss, argnums=(0, 1))(layer.parameters(), x)
        flat = [value, *outs, *(v for _, v in tree_flatten(grads))]
        mx.eval(flat)
        return flat

    want = run()  # the CPU path (compiled cells, gathers)
    monkeypatch.setattr(torch_layers, "default_steps", lambda cell, whole=True: cell.kernel_steps("cuda", whole))
    got = run()
    # one forward and one backward launch per layer, each of two problems (both directions)
    prefix = "frnn_res_" if klass == "resident" else "frnn_"
    assert len(emulated_gpu) == 2 * layer.num_layers and all(n.startswith(prefix) for n in emulated_gpu)
    for a, b in zip(got, want):
        scale = max(1.0, mx.abs(b).max().item())
        assert mx.abs(a - b).max().item() <= 2e-5 * scale


def test_measured_table_selects_the_resident_split(emulated_gpu, monkeypatch):
    """A table point (B, H, class, rows per block, rows per thread[, threads per
    unit]) is the split the class choice runs: the nearest point in (log B, log H),
    with its K-split; without the sixth entry one thread per unit."""
    table = {("lstm", "forward", "float32"): [(4, 12, "resident", 2, 1, 4), (64, 12, "tiled", 1, 0)],
             ("lstm", "backward", "float32"): [(4, 12, "resident", 2, 1, 4)]}
    monkeypatch.setattr(C, "SELECTION", table)
    xp, w = mx.zeros((3, 4, 48)), mx.zeros((48, 12))
    klass, p = C.choose("forward", "lstm", xp, w)
    assert (klass, p.BB, p.RPT, p.KSP) == ("resident", 2, 1, 4)
    klass, p = C.choose("backward", "lstm", xp, w)
    assert (klass, p.BB, p.KSP) == ("resident", 2, 4)
    assert C.choose("forward", "lstm", mx.zeros((3, 64, 48)), w)[0] == "tiled"
    table[("lstm", "forward", "float32")][0] = (4, 12, "resident", 2, 1)
    monkeypatch.setattr(C, "SELECTION", dict(table))  # a new table object: a new cache key
    assert C.choose("forward", "lstm", xp, w)[1].KSP == 1


def test_many_problems_take_fewer_larger_resident_blocks(emulated_gpu, monkeypatch):
    """The table's resident split is measured on one problem; where a launch's
    problems (heads) would need more blocks than SMs (and than the table point's own
    launch had) at its rows per block, the fewest rows per block that fit one block
    per SM run instead (a resident block runs the whole sequence: surplus blocks would
    share SMs or wait for a second wave), with the table's rows per thread; a launch
    that fits, or one the table measured with as many blocks, keeps the table's split.
    The results still match the reference (kernels emulated)."""
    table = {("lstm", d, "float32"): [(4, 12, "resident", 1, 1)] for d in ("forward", "backward")}
    monkeypatch.setattr(C, "SELECTION", table)
    # a table point whose own launch already had more blocks than SMs stands (measured so)
    big = {("lstm", d, "float32"): [(16, 12, "resident", 1, 1)] for d in ("forward", "backward")}
    monkeypatch.setattr(C, "SELECTION", big)
    assert C.choose("forward", "lstm", mx.zeros((3, 16, 48)), mx.zeros((48, 12)))[1].nblocks == 16
    monkeypatch.setattr(C, "SELECTION", table)
    w1, w4 = mx.zeros((48, 12)), mx.zeros((4, 48, 12))
    for direction in ("forward", "backward"):
        klass, p = C.choose(direction, "lstm", mx.zeros((3, 4, 48)), w1)  # 4 blocks <= 6 SMs
        assert (klass, p.BB, p.RPT, p.nblocks) == ("resident", 1, 1, 4)
        klass, p = C.choose(direction, "lstm", mx.zeros((3, 16, 48)), w4)  # 4 problems x 4 rows
        assert (klass, p.BB, p.RPT, p.nblocks) == ("resident", 4, 1, 4)
        assert p.nblocks <= SMALL.num_sms
    # a K-split measured on one-row blocks is not carried into the larger block
    split = {("lstm", d, "float32"): [(4, 12, "resident", 1, 1, 4)] for d in ("forward", "backward")}
    monkeypatch.setattr(C, "SELECTION", split)
    assert C.choose("forward", "lstm", mx.zeros((3, 4, 48)), w1)[1].KSP == 4
    p = C.choose("forward", "lstm", mx.zeros((3, 16, 48)), w4)[1]
    assert (p.BB, p.KSP, p.nblocks) == (4, 1, 4)
    monkeypatch.setattr(C, "SELECTION", table)
    L, B, H = 3, 4, 12

    def forward(xp, w, s0, params, zero, lens, rev):
        seqs = C.sequence("lstm", xp, w, s0, params, zero)
        return (*seqs, seqs[0])

    def backward(d_outs, xp, hp, prevs, params, w, need, lens, rev, d_out):
        return C.backward("lstm", (d_outs[0] + d_out, *d_outs[1:]), xp, hp, prevs, params, w, need)

    ref.check_varlen("lstm", L, B, H, mx.float32, False, None, 0, 4, forward, backward)
    assert len(emulated_gpu) == 2 and all(n.startswith("frnn_res_") for n in emulated_gpu)


def test_heads_forward_class(emulated_gpu, monkeypatch):
    """``ops.heads.forward_class``: the class the heads' forward launch would run on
    (what ``flashrnn`` picks its pre-activations' dtype by), for one head, heads in
    one launch and in two, as ``classes.choose`` says; ``None`` off the kernels'
    steps (CPU / Metal) and where no launch takes the heads."""
    from mlx_fastrnn.cells import LSTM_CELL
    from mlx_fastrnn.ops.heads import _launches, forward_class
    from mlx_fastrnn.ops.recurrent import default_steps

    cuda_steps = LSTM_CELL.kernel_steps("cuda", True)
    assert forward_class(LSTM_CELL, default_steps(LSTM_CELL), 3, 2, 4, 2, 12, mx.bfloat16) is None
    for klass in ("tiled", "resident"):
        monkeypatch.setenv("MLX_FASTRNN_KERNEL_CLASS", klass)
        for heads in (1, 2):
            assert forward_class(LSTM_CELL, cuda_steps, 3, 2, 4, heads, 12, mx.bfloat16) == klass
    monkeypatch.setenv("MLX_FASTRNN_KERNEL_CLASS", "tiled")
    # on 6 SMs two heads of 96 fit the tiled grid only one head per launch, three heads no launch
    assert _launches(cuda_steps, C.Operand((3, 2, 4 * 2 * 96), mx.bfloat16, 3), 4, 2, 96) == [(0, 1), (1, 2)]
    assert forward_class(LSTM_CELL, cuda_steps, 3, 2, 4, 2, 96, mx.bfloat16) == "tiled"
    assert _launches(cuda_steps, C.Operand((3, 2, 4 * 3 * 96), mx.bfloat16, 3), 4, 3, 96) is None
    assert forward_class(LSTM_CELL, cuda_steps, 3, 2, 4, 3, 96, mx.bfloat16) is None


def test_heads_need_only_a_forward_kernel(emulated_gpu, monkeypatch):
    """``accepts(kind="heads", forward_only=True)`` without lengths asks only for a
    forward kernel (a backward no kernel takes runs recurrence's step loop of
    problems): sLSTM heads whose forward fits the tiled grid at up to four elements
    per thread and whose backward (two at most) does not; without ``forward_only``,
    for directions and for heads with lengths both are needed. ``ops.heads._launches``
    takes such launches (all heads, else the halves) only where no launch (or two)
    runs both directions on the kernels. (One sLSTM head of 64 as a problem: its W_h
    fits no resident block here.)"""
    from mlx_fastrnn.cells import SLSTM_CELL
    from mlx_fastrnn.ops.heads import _launches

    # without the EPT fallback (on by default), which would take this backward at four
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_EPT_FALLBACK", "0")
    xp, w = mx.zeros((2, 64, 4 * 64)), mx.zeros((1, 4 * 64, 64))
    assert C.choose("forward", "slstm", xp, w)[0] == "tiled"
    assert C.choose("backward", "slstm", xp, w) == (None, None)
    assert C.accepts("slstm", xp, w, kind="heads", forward_only=True)
    assert not C.accepts("slstm", xp, w, kind="heads")
    with pytest.raises(ValueError, match="forward_only"):
        C.accepts("slstm", xp, w, kind="heads", varlen=True, forward_only=True)
    with pytest.raises(ValueError, match="forward_only"):
        C.accepts("slstm", xp, w, kind="directions", forward_only=True)
    monkeypatch.setenv("MLX_FASTRNN_PERSISTENT_PROBLEMS", "1")
    assert not C.accepts("slstm", xp, w, kind="directions")
    steps = SLSTM_CELL.kernel_steps("cuda", True)
    assert _launches(steps, C.Operand((2, 64, 4 * 64), mx.float32, 3), 4, 1, 64) == [(0, 1)]

    # a stand-in: all heads forward-only, halves with both kernels -> the halves
    def accepts(xp, w_h, varlen=False, kind="directions", forward_only=False):
        return w_h.shape[0] <= 2 or forward_only

    halves = dataclasses.replace(steps, accepts=accepts)
    assert _launches(halves, C.Operand((2, 64, 4 * 4 * 8), mx.float32, 3), 4, 4, 8) == [(0, 2), (2, 4)]
    # all heads forward-only, nothing with both -> one forward-only launch; halves forward-only only ->
    # two; not even those -> None
    fwd_only = dataclasses.replace(steps, accepts=lambda xp, w_h, varlen=False, kind="d", forward_only=False:
                                   forward_only)
    assert _launches(fwd_only, C.Operand((2, 64, 4 * 4 * 8), mx.float32, 3), 4, 4, 8) == [(0, 4)]
    part = dataclasses.replace(steps, accepts=lambda xp, w_h, varlen=False, kind="d", forward_only=False:
                               forward_only and w_h.shape[0] <= 2)
    assert _launches(part, C.Operand((2, 64, 4 * 4 * 8), mx.float32, 3), 4, 4, 8) == [(0, 2), (2, 4)]
    small = dataclasses.replace(steps, accepts=lambda xp, w_h, varlen=False, kind="d", forward_only=False:
                                forward_only and w_h.shape[0] <= 1)
    assert _launches(small, C.Operand((2, 64, 4 * 4 * 8), mx.float32, 3), 4, 4, 8) is None


def test_choice_cache_key_follows_the_environment(monkeypatch):
    """``classes._env_key`` (os.environ's mapping read directly, for speed) sees every
    change of the variables the class choice depends on, as os.environ does."""
    for name in (*C._ENV, "MLX_FASTRNN_PERSISTENT_PROBLEMS"):
        monkeypatch.delenv(name, raising=False)
    unset = C._env_key()
    assert unset == (None,) * len(unset)
    for i, name in enumerate((*C._ENV, "MLX_FASTRNN_PERSISTENT_PROBLEMS")):
        monkeypatch.setenv(name, "1")
        key = C._env_key()
        assert key[i] is not None and key[:i] == unset[:i] and key[i + 1:] == unset[i + 1:]
        monkeypatch.delenv(name)
        assert C._env_key() == unset


def test_grown_resident_blocks_keep_within_their_registers():
    """``classes._one_block_per_sm``: 16 heads of 128 at B = 64 (one-row table points:
    1024 blocks) grow to 8 rows a block. At the table's one row a thread that is 1024
    threads, 64 registers each: the LSTM's backward fits, so it keeps the table's split;
    the sLSTM's does not (``resident_plan.registers_fit``: it would spill), so it takes
    the model's rows per thread among those that fit."""
    h200 = P.Limits(num_sms=132, smem_per_block=232448, smem_per_sm=233472)
    for cell, rpt in (("lstm", 1), ("slstm", 4)):
        tuned = R.plan("backward", cell, 128, 64, h200, mx.bfloat16, 16, 1, 1)
        p = C._one_block_per_sm(tuned, 64, "backward", cell, 128, 64, h200, mx.bfloat16, 16)
        assert (p.BB, p.RPT, p.nblocks) == (8, rpt, 128) and R.registers_fit(p, h200)


# (cell, ZS mask of the zero initial states, lengths, REV mask, problems)
ZERO_STATE_CASES = [
    ("lstm", 0b11, None, 0, 1),        # neither state given: the drop-in layer's usual call
    ("lstm", 0b10, None, 0, 1),        # h_0 given, c_0 zero
    ("gru", 0b1, [4, 1, 3], 1, 1),     # lengths, reversed
    ("rnn_relu", 0b1, None, 0, 1),
    ("slstm", 0b0101, [2, 4, 4, 1], 0b10, 2),  # y, n zero; two problems, the second reversed
]


@pytest.mark.parametrize("klass", ["resident", "tiled"])
@pytest.mark.parametrize("cell,mask,lens,rev,problems", ZERO_STATE_CASES)
def test_zero_initial_states_take_no_arrays(emulated_gpu, monkeypatch, klass, cell, mask, lens, rev, problems):
    """A zero initial state is no array (kernels/contract.py's ZS): the forward gets
    None for it and reads a one-element placeholder never; the backward takes the
    state sequence itself as that state's ``prevs`` (shifted by a step inside the
    kernel, zero at step 0) instead of ``concat(zeros, seq[:-1])``. Outputs, dx,
    dhp and the given states' cotangents equal the reference's with zero arrays.
    The placeholder is NaN here, so a kernel that read it would give NaN. (A read
    before ``prevs`` at step 0 is out of bounds: MLX_FASTRNN_EMU_SANITIZE=1 checks it.)"""
    monkeypatch.setenv("MLX_FASTRNN_KERNEL_CLASS", klass)
    poison = mx.full((4096,), float("nan"))
    monkeypatch.setattr(P, "zero_operand", lambda: poison)
    inputs = []
    launch = P.launch

    def recording(spec, ins, shapes, dtypes):
        inputs.append([tuple(a.shape) for a in ins])
        return launch(spec, ins, shapes, dtypes)

    monkeypatch.setattr(P, "launch", recording)
    monkeypatch.setattr(R, "launch", recording)
    L, B, H = 4, 2 if problems == 2 else 3, 12
    if problems == 1:
        xp, w, s0, params = ref.problem(cell, L, B, H)
    else:
        _, (xp, w, s0, params) = ref.stacked_problems(cell, problems, L, B, H, mx.float32, False)
    zero = tuple((mask >> q) & 1 == 1 for q in range(len(s0)))
    s0 = tuple(mx.zeros_like(s) if z else s for s, z in zip(s0, zero))
    lens = None if lens is None else mx.array(lens, mx.int32)
    varlen = lens is not None or bool(rev)
    kw = dict(lens=lens, rev=rev) if varlen else {}
    given = tuple(None if z else s for s, z in zip(s0, zero))

    got = C.sequence(cell, xp, w, given, params, zero[0], **kw)
    want = C.sequence(cell, xp, w, s0, params, zero[0], **kw)  # zero arrays, read
    assert len(got) == len(want)
    for a, e in zip(got, want):
        assert ref.max_rel_err(a, e) == 0.0
    if not varlen:
        expected = ref.forward(cell, xp, w, s0, params, zero[0])
        for a, e in zip(got, expected):
            assert ref.max_rel_err(a, e) < 2e-6
    n = len(s0)
    state_inputs = inputs[0][2:2 + n]
    assert [s == (4096,) for s in state_inputs] == list(zero)  # placeholders only where zero

    seqs, hp = got[:n], got[n]
    d_outs = ref.cotangents(cell, L, xp.shape[1], H)
    d_out = ref.cotangents(cell, L, xp.shape[1], H, seed=5)[0] if varlen else None
    bkw = dict(kw, d_out=d_out) if varlen else {}
    need = not all(zero)
    shifted = tuple(seq if z else p for seq, p, z in zip(seqs, ref.prevs_of(s0, seqs), zero))
    got_b = C.backward(cell, d_outs, xp, hp, shifted, params, w, need, zero_states=mask, **bkw)
    want_b = C.backward(cell, d_outs, xp, hp, ref.prevs_of(s0, seqs), params, w, need, **bkw)
    for a, e in zip(got_b[:2], want_b[:2]):
        assert ref.max_rel_err(a, e) == 0.0
    if need:
        for a, e, z in zip(got_b[2], want_b[2], zero):
            assert ref.max_rel_err(a, e) == 0.0
    if not varlen:
        rdx, rdhp, _ = ref.backward(cell, d_outs, xp, hp, ref.prevs_of(s0, seqs), params, w, need)
        assert ref.max_rel_err(got_b[0], rdx) < 2e-6 and ref.max_rel_err(got_b[1], rdhp) < 2e-6


@pytest.mark.parametrize("klass", ["resident", "tiled"])
@pytest.mark.parametrize("states", ["none", "hidden", "cell", "both"])
def test_dropin_lstm_on_the_cuda_path_with_states_given_or_not(emulated_gpu, monkeypatch, klass, states):
    """The drop-in LSTM on the CUDA path (kernels emulated, the compiled op off: the
    emulator evaluates its inputs), with no state, h_0 only, c_0 only, or both: outputs
    and every gradient (weights, input, the given states) equal stock ``mlx.nn``'s."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    import mlx_fastrnn
    import mlx_fastrnn.ops.recurrent as OR

    monkeypatch.setenv("MLX_FASTRNN_KERNEL_CLASS", klass)
    monkeypatch.setenv("MLX_FASTRNN_COMPILE", "0")
    L, B, I, H = 5, 3, 4, 12
    mx.random.seed(3)
    layer = mlx_fastrnn.LSTM(I, H)
    stock = nn.LSTM(I, H)
    stock.update(layer.parameters())
    x = mx.random.normal((B, L, I), key=mx.random.key(1))
    h0 = mx.random.normal((B, H), key=mx.random.key(2)) if states in ("hidden", "both") else None
    c0 = mx.random.normal((B, H), key=mx.random.key(3)) if states in ("cell", "both") else None

    def run(m):
        def loss(params, x, h0, c0):
            m.update(params)
            h, c = m(x, h0, c0)
            return (h * mx.cos(h)).sum() + (c ** 2).sum()

        argnums = (0, 1) + ((2,) if h0 is not None else ()) + ((3,) if c0 is not None else ())
        value, grads = mx.value_and_grad(loss, argnums=argnums)(m.trainable_parameters(), x, h0, c0)
        flat = [value, *(v for _, v in tree_flatten(grads))]
        mx.eval(flat)
        return flat

    want = run(stock)
    monkeypatch.setattr(OR, "default_steps", lambda cell, whole=True: cell.kernel_steps("cuda", whole))
    got = run(layer)
    prefix = "frnn_res_" if klass == "resident" else "frnn_"
    assert len(emulated_gpu) == 2 and all(n.startswith(prefix) for n in emulated_gpu)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        scale = max(1.0, mx.abs(b).max().item())
        assert mx.abs(a - b).max().item() <= 2e-5 * scale


H100 = P.Limits(num_sms=132, smem_per_block=232448, smem_per_sm=233472, cc_major=9)


@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
@pytest.mark.parametrize("klass", ["resident", "tiled"])
@pytest.mark.parametrize("cell", ref.CELL_NAMES)
@pytest.mark.parametrize("varlen", [False, True])
def test_nvrtc_compiles_zero_initial_states(klass, cell, varlen):
    """Every initial state zero (``ZS`` all ones), forward and backward: the kernels
    compile under NVRTC with no more spills than with every state read (the tiled
    class within its 128 registers)."""
    S = P.CELLS[cell].num_states
    kw = dict(lens=varlen, rev=0b10 if varlen else 0)
    for direction in ("forward", "backward"):
        if klass == "resident":
            p = R.plan(direction, cell, 32, 8, H100, mx.float32, 2 if varlen else 1)
            specs = [R.kernel_spec(p, mx.float32, flag, **kw, zero_states=zs)
                     for flag, zs in ((0, 0), ((1 << S) - 1, 0)) if direction == "forward"] or \
                    [R.kernel_spec(p, mx.float32, True, **kw, zero_states=zs) for zs in (0, (1 << S) - 1)]
            w_dtype = p.w_dtype
        else:
            p = P.plan(direction, cell, 200, 32, H100, x_dtype=mx.float32, problems=2 if varlen else 1)
            specs = [P.kernel_spec(p, mx.float32, flag, **kw, zero_states=zs)
                     for flag, zs in ((0, 0), ((1 << S) - 1, 0)) if direction == "forward"] or \
                    [P.kernel_spec(p, mx.float32, True, **kw, zero_states=zs) for zs in (0, (1 << S) - 1)]
            w_dtype = p.w_dtype
        assert specs[0].name != specs[1].name or specs[0].template != specs[1].template
        (ok0, log0, base), (ok1, log1, masked) = (emu.compile_spec(s, mx.float32, w_dtype) for s in specs)
        assert ok0 and ok1, (log0 + log1)[-4000:]
        # (registers, spill stores, spill loads, stack bytes): the mask only leaves loads out
        assert all(m <= b for m, b in zip(masked[1:], base[1:])), (base, masked)
        assert klass == "resident" or masked[0] <= 128, masked


def test_a_call_without_states_makes_no_zero_arrays(monkeypatch, tmp_path):
    """The drop-in LSTM / GRU on the CUDA path, no initial state, the launch stubbed:
    the graph of its kernels' inputs (forward, and forward + backward of a loss of h
    and c) holds no fill (Full) and no join (Concatenate), except, for the LSTM's
    backward, the one zero cotangent MLX's autodiff makes for the output the loss
    does not use (c's sequence: here the loss uses h only)."""
    import collections
    import math
    import re

    from mlx.utils import tree_flatten

    import mlx_fastrnn
    import mlx_fastrnn.ops.recurrent as OR

    launched = []

    def launch(spec, inputs, output_shapes, output_dtypes):
        launched.extend(inputs)
        # stand-in outputs no real op makes (an Arange each)
        return [mx.arange(math.prod(s)).reshape(s).astype(d) for s, d in zip(output_shapes, output_dtypes)]

    monkeypatch.setattr(P, "launch", launch)
    monkeypatch.setattr(R, "launch", launch)
    monkeypatch.setattr(P, "cuda_available", lambda: True)
    monkeypatch.setattr(P, "device_limits", lambda: H100)
    monkeypatch.setattr(OR, "default_steps", lambda cell, whole=True: cell.kernel_steps("cuda", whole))
    monkeypatch.setenv("MLX_FASTRNN_COMPILE", "0")

    def nodes(outs, path):
        path = str(tmp_path / path)
        mx.export_to_dot(path, *outs, *launched)
        launched.clear()
        return collections.Counter(re.findall(r'label ="([A-Za-z]+)', open(path).read()))

    for name in ("LSTM", "GRU"):
        layer = getattr(mlx_fastrnn, name)(16, 16)
        x = mx.random.normal((3, 6, 16))
        mx.eval(x, layer.parameters())
        out = layer(x)
        fwd = nodes(list(out) if isinstance(out, tuple) else [out], "fwd.dot")
        assert fwd["Full"] == 0 and fwd["Concatenate"] == 0, fwd

        def loss(params, x):
            layer.update(params)
            o = layer(x)
            return (o[0] if isinstance(o, tuple) else o).sum()

        value, grads = mx.value_and_grad(loss, argnums=(0, 1))(layer.trainable_parameters(), x)
        both = nodes([value, *(g for _, g in tree_flatten(grads))], "fwdbwd.dot")
        assert both["Concatenate"] == 0, both
        assert both["Full"] == (1 if name == "LSTM" else 0), both
