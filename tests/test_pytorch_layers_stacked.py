"""The PyTorch-compatible layers on the whole-sequence CUDA kernels, checked on
the CPU: the persistent kernels run in the CPU emulator behind a stand-in of
the CUDA steps, and the layer's outputs, final states and every gradient must
equal the same layer on the CPU path (gathers around each direction). Covered:
a bidirectional layer's two directions as ONE two-problem launch (the second
reversed inside the kernel), each direction as its own launch with the lengths
and the reversal inside the kernel, and the plain (no lengths) kernels; so the
layer's dispatch, ops/direction.py, the driver's varlen and multi-problem
custom functions and gradients, and the kernels' problem axis."""

import dataclasses

import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

import persistent_emulator as emu
from mlx_fastrnn.kernels import persistent as P
from mlx_fastrnn.pytorch import GRU, LSTM, RNN
from mlx_fastrnn.pytorch import layers as torch_layers

LIMITS = P.Limits(num_sms=8, smem_per_block=48 * 1024, smem_per_sm=100 * 1024)

pytestmark = pytest.mark.skipif(emu.host_compiler() is None, reason="no C++ compiler for the emulator")


def _emulated_steps(cell, calls, problems, varlen):
    """The CUDA steps of ``cell`` with every launch run by the emulator (the
    tiled class); ``problems`` / ``varlen``: whether they take several
    problems per launch / lengths and reversal inside the kernels. ``calls``
    collects (w_h.ndim, lens given, rev) per forward launch."""
    def forward_sequence(xp, w_h, states0, params, h0_is_zero, lens=None, rev=0, interleaved=False):
        calls.append((w_h.ndim, lens is not None, rev, interleaved))
        return emu.forward(cell.name, xp, w_h, states0, params, h0_is_zero, LIMITS, lens=lens, rev=rev,
                           interleaved=interleaved)[0]

    def backward_sequence_kernel(d_outs, xp, hp, prevs, params, w_h, need, lens=None, rev=0, d_out=None,
                                 interleaved=False, zero_states=0):
        return emu.backward(cell.name, d_outs, xp, hp, prevs, params, w_h, need, LIMITS,
                            lens=lens, rev=rev, d_out=d_out, interleaved=interleaved, zero_states=zero_states)[0]

    def accepts(xp, w_h, varlen=False, kind="directions"):
        if (w_h.ndim == 3 and not problems) or (varlen and not accept_varlen):
            return False
        return (P.select("forward", cell.name, xp, w_h, LIMITS) is not None
                and P.select("backward", cell.name, xp, w_h, LIMITS) is not None)

    accept_varlen = varlen
    return dataclasses.replace(cell.compiled_steps, name="emulated-cuda", forward_sequence=forward_sequence,
                               backward_sequence_kernel=backward_sequence_kernel, accepts=accepts)


def _loss_and_grads(layer, x, hx, lengths):
    def loss(params, x, hx):
        layer.update(params)
        out, st = layer(x, hx, lengths)
        states = st if isinstance(st, tuple) else (st,)
        w = mx.random.normal(out.shape, key=mx.random.key(9))
        return (out * w).sum() + sum((s ** 2).sum() for s in states), (out, *states)

    argnums = (0, 1) if hx is None else (0, 1, 2)
    (value, outs), grads = mx.value_and_grad(loss, argnums=argnums)(layer.parameters(), x, hx)
    flat = [value, *outs, *(v for _, v in tree_flatten(grads))]
    mx.eval(flat)
    return flat


CASES = [
    (LSTM, dict(num_layers=2), True, True),
    (GRU, dict(), False, True),
    (GRU, dict(num_layers=2, bias=True), True, False),
    (RNN, dict(nonlinearity="relu"), False, False),
    (RNN, dict(), True, True),
]

# (several problems per launch, lengths inside the kernels) -> what every forward launch must be
DISPATCH = {
    "both_one_launch": (True, True),     # one two-problem launch, problem 1 reversed in the kernel
    "one_launch_each": (False, True),    # a launch per direction, lengths / reversal in the kernel
    "gathers_one_launch": (True, False),  # the two directions stacked after a reversing gather
}


@pytest.mark.parametrize("dispatch", list(DISPATCH))
@pytest.mark.parametrize("cls,kw,with_hx,with_lengths", CASES)
def test_kernel_paths_match_the_cpu_path(monkeypatch, dispatch, cls, kw, with_hx, with_lengths):
    L, B, I, H = 5, 3, 4, 12
    mx.random.seed(0)
    layer = cls(I, H, bidirectional=True, **kw)
    x = mx.random.normal((L, B, I), key=mx.random.key(1))
    hx = None
    if with_hx:
        d = 2 * layer.num_layers
        h = mx.random.normal((d, B, H), key=mx.random.key(2)) * 0.5
        hx = (h, mx.random.normal((d, B, H), key=mx.random.key(3)) * 0.5) if cls is LSTM else h
    lengths = mx.array([5, 2, 4]) if with_lengths else None
    want = _loss_and_grads(layer, x, hx, lengths)

    problems, varlen = DISPATCH[dispatch]
    calls = []
    monkeypatch.setattr(torch_layers, "default_steps",
                        lambda cell, whole=True: _emulated_steps(cell, calls, problems, varlen))
    got = _loss_and_grads(layer, x, hx, lengths)
    if dispatch == "both_one_launch":
        # both directions' projections and the output as they are: problem-interleaved
        assert calls and all(c == (3, with_lengths, 0b10, True) for c in calls)
    elif dispatch == "one_launch_each":
        # without lengths the forward direction runs the plain kernel: (2, False, 0)
        assert sorted(set(calls)) == [(2, with_lengths, 0, False), (2, with_lengths, 1, False)]
    else:
        assert calls and all(c == (3, False, 0, False) for c in calls)
    for a, b in zip(got, want):
        scale = max(1.0, mx.abs(b).max().item())
        assert mx.abs(a - b).max().item() <= 2e-5 * scale
