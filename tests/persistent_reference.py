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
    # one key per state (two keys indexed past their end gave the sLSTM's last two
    # states' cotangents from whatever memory followed: different in every call)
    ks = mx.random.split(mx.random.key(seed), cell.num_states)
    return tuple(mx.random.normal((L, B, H), key=ks[i]) for i in range(cell.num_states))


def mma_rounding(kind):
    """The rounding a tensor-core plan (``Plan.mma``: 1 bfloat16, 2 float16, 3 tf32)
    applies to both operands of its projection, as a function of a float32 array."""
    if kind == 1:
        return lambda a: a.astype(mx.bfloat16).astype(mx.float32)
    if kind == 2:
        return lambda a: a.astype(mx.float16).astype(mx.float32)
    if kind == 3:  # cvt.rna.tf32.f32: to nearest (ties away) at 10 mantissa bits
        return lambda a: ((a.view(mx.uint32) + 0x1000) & 0xFFFFE000).view(mx.float32)
    return lambda a: a


def forward(cell_name, xp, w_h, states0, params, h0_is_zero, mma=0):
    """(seqs..., hp), each stacked over time; ``mma``: both operands of every
    projection rounded as that tensor-core plan rounds them (``mma_rounding``)."""
    cell = CELLS[cell_name]
    rnd = mma_rounding(mma)
    step = functools.partial(cell.forward_step, **cell.step_kwargs)
    states = tuple(states0)
    seqs = [[] for _ in range(cell.num_states + 1)]
    for t in range(xp.shape[0]):
        if t == 0 and h0_is_zero:
            hp = mx.zeros((xp.shape[1], xp.shape[2]), mx.float32)
        else:
            hp = rnd(states[0]) @ rnd(w_h).T
        states = step(xp[t], hp, states, params)
        for s, a in zip(seqs, (*states, hp)):
            s.append(a)
    return tuple(mx.stack(s) for s in seqs)


def prevs_of(states0, seqs):
    return tuple(mx.concatenate([s0[None], seq[:-1]], axis=0) for s0, seq in zip(states0, seqs))


def backward(cell_name, d_outs, xp, hp, prevs, params, w_h, need_d_state0, mma=0):
    """(dx, dhp, d_states0 or None), one reference backward step at a time (``mma``:
    as in :func:`forward`, for the projection dhp W_h)."""
    cell = CELLS[cell_name]
    rnd = mma_rounding(mma)
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
        dh = rnd(dhp) @ rnd(w_h) if direct[0] is None else direct[0] + rnd(dhp) @ rnd(w_h)
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


# --------------------------------------------------------------------------- variable lengths, directions


def step_positions(lens, rev, L):
    """``(pos, active)`` [L, B]: the position step t of row b reads (``len-1-t``
    for reversed rows, else t; t itself once the row is past its length) and
    whether the row is still inside its length (the kernels' varlen contract)."""
    t = mx.arange(L)[:, None]
    n = mx.array(lens, mx.int32)[None, :]
    active = t < n
    pos = mx.where(mx.array(rev)[None, :] & active, n - 1 - t, t)
    return pos, active


def varlen_forward(cell_name, xp, w_h, states0, params, h0_is_zero, lens, rev, mma=0):
    """(seqs..., hp, out) of the varlen kernels, as masked MLX ops (differentiable):
    per row ``lens[b]`` valid steps, ``rev[b]`` = the row runs from its end; states
    frozen past the length; ``out`` in position order, zero past the length
    (``mma``: the projection's operands rounded as in :func:`forward`)."""
    cell = CELLS[cell_name]
    rnd = mma_rounding(mma)
    step = functools.partial(cell.forward_step, **cell.step_kwargs)
    L = xp.shape[0]
    pos, active = step_positions(lens, rev, L)
    xs = mx.take_along_axis(xp, pos[:, :, None], axis=0)
    states = tuple(states0)
    seqs = [[] for _ in range(cell.num_states + 1)]
    for t in range(L):
        if t == 0 and h0_is_zero:
            hp = mx.zeros((xp.shape[1], xp.shape[2]), mx.float32)
        else:
            hp = rnd(states[0]) @ rnd(w_h).T
        new = step(xs[t], hp, states, params)
        on = active[t][:, None]
        states = tuple(mx.where(on, a, b) for a, b in zip(new, states))
        for s, a in zip(seqs, (*states, mx.where(on, hp, 0.0))):
            s.append(a)
    seqs = [mx.stack(s) for s in seqs]
    # position p of a row holds step p (forward) or len-1-p (reversed): the same map
    out = mx.where(active[:, :, None], mx.take_along_axis(seqs[0], pos[:, :, None], axis=0), 0.0)
    return (*seqs, out)


def varlen_grads(cell_name, xp, w_h, states0, params, h0_is_zero, lens, rev, d_seqs, d_out):
    """(d xp, d w_h, d states0) of :func:`varlen_forward` for the cotangents of its
    state sequences and of ``out`` (``mx.vjp``: an oracle independent of the
    cells' hand-written backward steps)."""
    S = len(states0)

    def fn(xp_, w_, *s0):
        outs = varlen_forward(cell_name, xp_, w_, s0, params, h0_is_zero, lens, rev)
        return (*outs[:S], outs[-1])

    _, grads = mx.vjp(fn, [xp.astype(mx.float32), w_h, *states0], [*d_seqs, d_out])
    return grads[0], grads[1], tuple(grads[2:])


def stacked_problems(cell_name, problems, L, B, H, x_dtype, zero):
    """``problems`` independent problems (own W_h, params, rows), stacked the way
    the kernels take them: rows problem-major, W_h [NP, G*H, H], params [NP, H]
    (one problem: as it is). Returns (parts, stacked)."""
    parts = [problem(cell_name, L, B, H, x_dtype, seed=10 + k) for k in range(problems)]
    if zero:
        parts = [(xp, w, tuple(mx.zeros_like(s) for s in s0), prm) for xp, w, s0, prm in parts]
    if problems == 1:
        return parts, parts[0]
    xp = mx.concatenate([p[0] for p in parts], axis=1)
    w = mx.stack([p[1] for p in parts])
    s0 = tuple(mx.concatenate(ss, axis=0) for ss in zip(*(p[2] for p in parts)))
    params = tuple(mx.stack(qs) for qs in zip(*(p[3] for p in parts)))
    return parts, (xp, w, s0, params)


def interleave(a, problems):
    """[L, NP*B, K] problem-major rows -> problem-interleaved (row ``b * NP + p``)."""
    L, rows, K = a.shape
    return mx.contiguous(a.reshape(L, problems, rows // problems, K).swapaxes(1, 2).reshape(L, rows, K))


def deinterleave(a, problems):
    """The inverse of :func:`interleave`."""
    L, rows, K = a.shape
    return mx.contiguous(a.reshape(L, rows // problems, problems, K).swapaxes(1, 2).reshape(L, rows, K))


def check_varlen(cell_name, L, B, H, x_dtype, zero, lens, rev, problems, forward, backward, on=None,
                 tol=(2e-6, 1e-5), interleaved=False, mma=0):
    """One varlen launch pair against the masked reference: ``forward(xp, w_h,
    states0, params, h0_is_zero, lens=, rev=) -> (seqs..., hp, out)`` and
    ``backward(d_outs, xp, hp, prevs, params, w_h, need, lens=, rev=, d_out=) ->
    (dx, dhp, d0)`` run ``problems`` stacked problems of ``B`` rows with
    ``lens`` (per row, or None) and ``rev`` (bit p: problem p reversed). Checks
    the forward's outputs (``tol[0]``), and dx, dW_h = sum dhp^T h_prev and the
    initial-state cotangents (``tol[1]``) against ``mx.vjp`` of
    :func:`varlen_forward`; ``on``: how to run the reference (default: directly;
    :func:`on_cpu` for a GPU test). ``lens`` may also be the full list of lengths
    for the rows, with ``B`` rows per problem. ``interleaved``: the kernels get
    ``xp`` and ``d_out`` problem-interleaved and return ``out`` and ``dx`` so
    (``forward`` / ``backward`` are passed ``interleaved=True``). ``mma``: the
    forward reference rounds the projection's operands as that tensor-core plan
    (the vjp passes the rounding straight through: ``tol[1]`` must allow for it)."""
    run = on or (lambda fn, *args: fn(*args))
    parts, (xp, w, s0, params) = stacked_problems(cell_name, problems, L, B, H, x_dtype, zero)
    rows = problems * B
    row_lens = lens or [L] * rows
    row_rev = [bool((rev >> (r // B)) & 1) for r in range(rows)]
    lens_a = None if lens is None else mx.array(lens, mx.int32)
    S = CELLS[cell_name].num_states
    kw = {"interleaved": True} if interleaved else {}
    xin = interleave(xp, problems) if interleaved else xp
    got = forward(xin, w, s0, params, zero, lens=lens_a, rev=rev, **kw)
    assert len(got) == S + 2
    if interleaved:
        got = (*got[:-1], deinterleave(got[-1], problems))
    seqs, hp = got[:S], got[S]
    prevs = prevs_of(s0, seqs)
    d_seqs = cotangents(cell_name, L, rows, H)
    d_out = cotangents(cell_name, L, rows, H, seed=7)[0]
    need = not zero
    dx, dhp, d0 = backward(d_seqs, xin, hp, prevs, params, w, need, lens=lens_a, rev=rev,
                           d_out=interleave(d_out, problems) if interleaved else d_out, **kw)
    if interleaved:
        dx = deinterleave(dx, problems)
    assert (d0 is not None) == need
    for k, (pxp, pw, ps0, pprm) in enumerate(parts):
        sl = slice(k * B, (k + 1) * B)
        pxp = pxp.astype(mx.float32)
        expected = run(varlen_forward, cell_name, pxp, pw, ps0, pprm, zero, row_lens[sl], row_rev[sl], mma)
        for i, (a, e) in enumerate(zip(got, expected)):
            assert max_rel_err(a[:, sl], e) < tol[0], f"forward output {i} of problem {k}"
        rdx, rdw, rd0 = run(varlen_grads, cell_name, pxp, pw, ps0, pprm, zero, row_lens[sl], row_rev[sl],
                            [d[:, sl] for d in d_seqs], d_out[:, sl])
        assert max_rel_err(dx[:, sl], rdx) < tol[1], f"dx of problem {k}"
        dw = run(mx.einsum, "tbg,tbh->gh", dhp[:, sl], prevs[0][:, sl])
        assert max_rel_err(dw, rdw) < tol[1], f"dW_h of problem {k}"
        if need:
            for q, (a, e) in enumerate(zip(d0, rd0)):
                assert max_rel_err(a[sl], e) < tol[1], f"d state0 {q} of problem {k}"
