"""A bidirectional layer's two directions as ONE two-problem recurrence (what
the whole-sequence CUDA kernels run in one launch), checked on the CPU: the
persistent kernels run in the CPU emulator behind a stand-in of the CUDA
steps, and the layer's outputs, final states and every gradient must equal
the same layer on the CPU path (each direction alone). This covers the
stacking and un-stacking in the layer and ops/direction.py, the driver's
multi-problem weight and parameter gradients, and the kernels' problem axis."""

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


def _emulated_steps(cell, calls):
    """The CUDA steps of ``cell`` with every launch run by the emulator."""
    def forward_sequence(xp, w_h, states0, params, h0_is_zero):
        calls.append(w_h.ndim)
        return emu.forward(cell.name, xp, w_h, states0, params, h0_is_zero, LIMITS)[0]

    def backward_sequence_kernel(d_outs, xp, hp, prevs, params, w_h, need):
        return emu.backward(cell.name, d_outs, xp, hp, prevs, params, w_h, need, LIMITS)[0]

    def accepts(xp, w_h):
        return (P.select("forward", cell.name, xp, w_h, LIMITS) is not None
                and P.select("backward", cell.name, xp, w_h, LIMITS) is not None)

    return dataclasses.replace(cell.compiled_steps, name="emulated-cuda", forward_sequence=forward_sequence,
                               backward_sequence_kernel=backward_sequence_kernel, accepts_problems=accepts)


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


@pytest.mark.parametrize("cls,kw,with_hx,with_lengths", [
    (LSTM, dict(num_layers=2), True, True),
    (GRU, dict(), False, True),
    (GRU, dict(num_layers=2, bias=True), True, False),
    (RNN, dict(nonlinearity="relu"), False, False),
])
def test_two_problem_launch_matches_each_direction_alone(monkeypatch, cls, kw, with_hx, with_lengths):
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

    calls = []
    monkeypatch.setattr(torch_layers, "default_steps", lambda cell, whole=True: _emulated_steps(cell, calls))
    got = _loss_and_grads(layer, x, hx, lengths)
    assert calls and all(n == 3 for n in calls), "the two directions did not run as one launch"
    for a, b in zip(got, want):
        scale = max(1.0, mx.abs(b).max().item())
        assert mx.abs(a - b).max().item() <= 2e-5 * scale
