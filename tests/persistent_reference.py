"""Reference loops and random problems for the persistent-kernel tests.

The oracle is the cells' plain reference steps (``naive.forward_step`` /
``naive.backward_step``), one time step at a time, with the driver's
conventions: ``hp_t = h_{t-1} W_h^T`` (zero at t = 0 when the initial state is
zero) and ``dh_{t-1} = direct + dhp_t W_h``.
"""

import functools
import math

import mlx.core as mx

from mlx_fastrnn.cells import GRU_CELL, LSTM_CELL, RNN_RELU_CELL, RNN_TANH_CELL, SLSTM_CELL

CELLS = {"gru": GRU_CELL, "lstm": LSTM_CELL, "rnn_tanh": RNN_TANH_CELL, "rnn_relu": RNN_RELU_CELL,
         "slstm": SLSTM_CELL}
CELL_NAMES = list(CELLS)


def problem(cell_name, L, B, H, x_dtype=mx.float32, seed=0, w_scale=0.9):
    """Random forward inputs: (xp, w_h, states0, params)."""
    cell = CELLS[cell_name]
    G = cell.num_gates
    ks = mx.random.split(mx.random.key(seed), 8)
    xp = mx.random.normal((L, B, G * H), key=ks[0]).astype(x_dtype)
    w_h = mx.random.normal((G * H, H), key=ks[1]) * (w_scale / math.sqrt(H))
    states0 = tuple(mx.random.normal((B, H), key=ks[2 + i]) * 0.5 for i in range(cell.num_states))
    if cell_name == "slstm":
        # a reachable state: the normalizer n >= 1 (and exactly 0 in one row: a fresh one)
        y, c, n, m = states0
        n = mx.where(mx.arange(B)[:, None] == 0, 0.0, 1.0 + mx.abs(n))
        states0 = (y, c, n, m)
    params = (mx.random.normal((H,), key=ks[5]) * 0.1,) if cell_name == "gru" else ()
    return xp, w_h, states0, params


def cotangents(cell_name, L, B, H, seed=1):
    cell = CELLS[cell_name]
    ks = mx.random.split(mx.random.key(seed), 2)
    return tuple(mx.random.normal((L, B, H), key=ks[i]) for i in range(cell.num_states))


def forward(cell_name, xp, w_h, states0, params, h0_is_zero):
    """(seqs..., hp), each stacked over time."""
    cell = CELLS[cell_name]
    step = functools.partial(cell.forward_step, **cell.step_kwargs)
    states = tuple(states0)
    seqs = [[] for _ in range(cell.num_states + 1)]
    for t in range(xp.shape[0]):
        if t == 0 and h0_is_zero:
            hp = mx.zeros((xp.shape[1], xp.shape[2]), mx.float32)
        else:
            hp = states[0] @ w_h.T
        states = step(xp[t], hp, states, params)
        for s, a in zip(seqs, (*states, hp)):
            s.append(a)
    return tuple(mx.stack(s) for s in seqs)


def prevs_of(states0, seqs):
    return tuple(mx.concatenate([s0[None], seq[:-1]], axis=0) for s0, seq in zip(states0, seqs))


def backward(cell_name, d_outs, xp, hp, prevs, params, w_h, need_d_state0):
    """(dx, dhp, d_states0 or None), one reference backward step at a time."""
    cell = CELLS[cell_name]
    step = functools.partial(cell.backward_step, **cell.step_kwargs)
    L = xp.shape[0]
    d_rec = tuple(mx.zeros_like(p[0]) for p in prevs)
    dxs, dhps = [None] * L, [None] * L
    for t in reversed(range(L)):
        dx, dhp, direct = step(tuple(d[t] for d in d_outs), d_rec, xp[t], hp[t],
                               tuple(p[t] for p in prevs), params)
        dxs[t], dhps[t] = dx, dhp
        if t == 0 and not need_d_state0:
            break
        dh = dhp @ w_h if direct[0] is None else direct[0] + dhp @ w_h
        d_rec = (dh,) + tuple(direct[1:])
    return mx.stack(dxs), mx.stack(dhps), (d_rec if need_d_state0 else None)


def max_rel_err(actual, expected):
    """max |a - e| / max(1, max |e|) (NaN anywhere gives inf), computed on the CPU."""
    assert tuple(actual.shape) == tuple(expected.shape), (actual.shape, expected.shape)
    if actual.size == 0:
        return 0.0
    with mx.stream(mx.cpu):
        a, e = actual.astype(mx.float32), expected.astype(mx.float32)
        diff = mx.abs(a - e).max().item()
        scale = max(1.0, mx.abs(e).max().item())
    return diff / scale if math.isfinite(diff) else math.inf


def cuda_available():
    try:
        return bool(mx.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def on_cpu(fn, *args):
    """``fn(*args)`` evaluated on the CPU stream (no GPU matmul shortcuts in an oracle)."""
    with mx.stream(mx.cpu):
        out = fn(*args)
        mx.eval(out)
    return out


def gpu_tol(L):
    """Relative tolerance of a GPU kernel against the CPU reference after L steps."""
    return 2e-5 if L <= 64 else 2e-4


def check_problems_backward(cell_name, parts, got, d_outs, hp, prevs, need, tol, on=None, weights=None):
    """Each problem's rows of a multi-problem backward ``got = (dx, dhp, d0)``
    against the reference backward of that problem alone. ``parts``: the
    problems' ``(xp, w_h, states0, params)``; ``on``: how to run the reference
    (default: directly); ``weights``: the W_h the reference uses per problem."""
    dx, dhp, d0 = got
    run = on or (lambda fn, *args: fn(*args))
    B = dx.shape[1] // len(parts)
    for k, (pxp, pw, _, pprm) in enumerate(parts):
        rows = slice(k * B, (k + 1) * B)
        rdx, rdhp, rd0 = run(backward, cell_name, tuple(d[:, rows] for d in d_outs), pxp, hp[:, rows],
                             tuple(q[:, rows] for q in prevs), pprm, weights(pw) if weights else pw, need)
        assert max_rel_err(dx[:, rows], rdx) < tol, f"dx of problem {k}"
        assert max_rel_err(dhp[:, rows], rdhp) < tol, f"dhp of problem {k}"
        if need:
            for a, e in zip(d0, rd0):
                assert max_rel_err(a[rows], e) < tol, f"d_state0 of problem {k}"
