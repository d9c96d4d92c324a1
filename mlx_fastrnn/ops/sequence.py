"""The recurrence driver: the time loop of any cell, with a fused backward.

``recurrence`` runs a cell over a time-major sequence of input pre-activations.
It is one ``mx.custom_function``; its VJP walks time backwards (per-step fused
kernels on a GPU, the cell's vectorized ``backward_sequence`` on the CPU) and
then forms the weight gradient as ONE matmul over the whole sequence instead
of one small matmul per step, as autodiff of the loop would. Besides the
output sequences only the recurrent projections ``h_{t-1} W_h^T`` are kept for
the backward (recomputing them would cost a third more matmul work, which
dominates on the CPU); the gates are recomputed elementwise.
"""

import mlx.core as mx

from ..cells.timeaxis import per_problem_matmul, split_time
from .projection import transposed

_FUNCTIONS = {}


def recurrence(cell, steps, xp, w_h, states0, params, given, lens=None, rev=0, interleaved=False):
    """Run ``cell`` over ``xp``.

    Args:
        cell: a :class:`mlx_fastrnn.cells.Cell`.
        steps: a :class:`mlx_fastrnn.cells.Steps` (compiled reference, kernels).
        xp: [L, B, G*H] input pre-activations, row contiguous (any float dtype).
        w_h: [G*H, H] float32 recurrent weights, or [NP, G*H, H] for NP
            independent problems whose rows are stacked problem-major in xp,
            states and outputs (params then [NP, ...]): on the whole-sequence
            kernels where ``steps.accepts`` says they take them, else on the
            per-step kernels (one batched matmul per step) for a cell without
            params and steps with a ``backward_step``.
        states0: initial states, each [B, H] float32; those not ``given`` are
            zero whatever is passed (None, or an array never read).
        params: the cell's extra float32 params (GRU: ``(bhn,)``).
        given: per state, whether the caller passed it. States not given are
            zero and not inputs of the op: no cotangent is formed for them, the
            first recurrent matmul is skipped when h is not given, and the
            whole-sequence kernels take no array for them (no zero fill).
        lens, rev: per-row lengths (int32 [B], each in 1..L: the caller
            validates them) and directions (bit p set: problem p runs from each
            row's end to its start), inside the whole-sequence kernels
            (``kernels/contract.py``); only where ``steps.accepts(..., varlen=True)``.
        interleaved: ``xp`` [L, B, G*H] is problem-interleaved (row ``b * NP + p``
            is row ``b`` of problem ``p``: a bidirectional layer's projection
            [L, B / NP, NP * G*H] viewed so), and so is ``out`` (the directions
            concatenated on the last axis); the state sequences stay
            problem-major. Whole-sequence kernels only, as ``lens`` / ``rev``.

    Returns:
        One [L, B, H] float32 sequence per state; with ``lens`` / ``rev``
        ``(out, seqs)``: ``out`` [L, B, H] the output in position order, zero
        past each length, and the state sequences in step order, frozen past
        each length (so ``seq[-1]`` is every row's final state).
    """
    varlen = (lens is not None, int(rev), bool(interleaved)) if lens is not None or rev or interleaved else None
    key = (cell.name, steps, tuple(given), len(params), varlen)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        fn = _FUNCTIONS[key] = _make_function(cell, steps, tuple(given), len(params), varlen)
    n = cell.num_states
    states0 = tuple(s for s, g in zip(states0, given) if g)
    if varlen is None:
        return fn(xp, w_h, *states0, *params)[:n]
    outs = fn(xp, w_h, *states0, *params, *(() if lens is None else (lens,)))
    return outs[n + 1], outs[:n]


def _make_function(cell, steps, given, n_params, varlen):
    n = cell.num_states
    h0_is_zero, need_d_states0 = not given[0], any(given)
    has_lens, rev, interleaved = varlen or (False, 0, False)
    n_given = sum(given)
    n_primals = 2 + n_given + n_params + has_lens
    # the kernels' ZS mask (kernels/contract.py): the states not given are zero
    zero_states = sum(1 << q for q, g in enumerate(given) if not g)

    def split(rest):
        """states0 (None where not given), params, lens (or None) from the primals after xp, w_h."""
        it = iter(rest[:n_given])
        states0 = tuple(next(it) if g else None for g in given)
        return states0, tuple(rest[n_given:n_given + n_params]), (rest[n_given + n_params] if has_lens else None)

    @mx.custom_function
    def run(xp, w_h, *rest):
        states, params, lens = split(rest)
        if varlen is not None:
            # (seqs..., hp, out); no per-step form: callers check steps.accepts first
            out = steps.forward_sequence(xp, w_h, states, params, h0_is_zero, lens=lens, rev=rev,
                                         interleaved=interleaved)
            if out is None:
                raise RuntimeError("mlx_fastrnn: lengths inside the recurrence need the whole-sequence kernels")
            return out
        if steps.forward_sequence is not None:
            out = steps.forward_sequence(xp, w_h, states, params, h0_is_zero)
            if out is not None:
                return out
        if w_h.ndim == 3 and steps.backward_step is None and steps.backward_sequence is None:
            raise RuntimeError("mlx_fastrnn: a multi-problem recurrence without a backward needs the "
                               "whole-sequence kernels")
        length, batch = xp.shape[0], xp.shape[1]
        states = _zero_filled(states, batch, w_h.shape[-1])
        w_h_t = transposed(w_h, length * batch)  # reused by every step; per problem: [NP, H, G*H]
        params = _per_row(params, w_h, batch)
        seqs = [[] for _ in range(n + 1)]  # each state, then hp
        for t, x_t in enumerate(split_time(xp)):
            if t == 0 and h0_is_zero:
                hp = mx.zeros(x_t.shape, mx.float32)
            else:
                hp = per_problem_matmul(states[0], w_h_t)
            states = steps.forward_step(x_t, hp, states, params)
            for seq, a in zip(seqs, (*states, hp)):
                seq.append(a)
        return tuple(_concat_time(seq, length, batch) for seq in seqs)

    @run.vjp
    def run_vjp(primals, cotangents, outputs):
        # the cotangents of the state sequences (and, varlen, of out; hp has none)
        picked = [*range(n), *((n + 1,) if varlen is not None else ())]
        d_outs = tuple(
            mx.zeros_like(outputs[i]) if cotangents[i] is None else cotangents[i] for i in picked
        )
        grads = backward(*primals, *outputs, *d_outs)
        return (*grads, mx.zeros_like(primals[-1])) if has_lens else grads

    # The backward is itself a custom function whose VJP refuses: its formulas
    # take the saved outputs as constants, so a gradient of the gradient
    # (gradient penalties, Hessian-vector products) would be silently wrong.
    @mx.custom_function
    def backward(xp, w_h, *rest):
        states0, params, lens = split(rest)
        k = n_primals - 2
        outputs = rest[k: k + n + 1]  # the state sequences and hp (varlen: out after them, unused)
        d_outs = rest[k + n + 1 + (varlen is not None):]
        d_out = d_outs[n] if varlen is not None else None
        d_outs = d_outs[:n]
        length, hidden = xp.shape[0], w_h.shape[-1]
        hp = outputs[n]
        # The state entering each step, for the kernels: a state that started at zero
        # as its sequence itself (the kernels shift it by a step, ZS); no join, no zeros.
        kernel_prevs = tuple(seq if s0 is None else mx.concatenate([s0[None], seq[:-1]], axis=0)
                             for s0, seq in zip(states0, outputs))
        whole = None
        if varlen is not None:
            whole = steps.backward_sequence_kernel(
                d_outs, xp, hp, kernel_prevs, params, w_h, need_d_states0, lens=lens, rev=rev, d_out=d_out,
                interleaved=interleaved, zero_states=zero_states,
            )
            if whole is None:
                raise RuntimeError("mlx_fastrnn: lengths inside the recurrence need the whole-sequence kernels")
        elif steps.backward_sequence_kernel is not None:
            whole = steps.backward_sequence_kernel(
                d_outs, xp, hp, kernel_prevs, params, w_h, need_d_states0, zero_states=zero_states
            )
        if whole is not None:
            dx, dhp, d_states0 = whole
        else:  # a whole-sequence backward (the CPU's) or one per step; per-problem params per row
            zero_filled = _zero_filled(states0, xp.shape[1], hidden)
            prevs = tuple(p if s0 is not None else mx.concatenate([z[None], p[:-1]], axis=0)
                          for p, s0, z in zip(kernel_prevs, states0, zero_filled))
            step_params = _per_row(params, w_h, xp.shape[1])
            if steps.backward_sequence is not None:
                dx, dhp, d_states0 = steps.backward_sequence(
                    d_outs, xp, hp, prevs, step_params, w_h, need_d_states0
                )
            else:
                dx, dhp, d_states0 = _backward_by_steps(
                    steps.backward_step, d_outs, xp, hp, prevs, step_params, w_h, need_d_states0
                )
        # cotangents of the given states only (the others are not inputs)
        d_states0 = tuple(d for d, g in zip(d_states0 or (), given) if g)
        # d W_h = sum_t dhp_t^T h_{t-1}: one matmul over the whole sequence. A zero
        # initial state contributes nothing, so its step is left out (and so do a
        # varlen row's frozen steps: the kernel leaves their dhp zero).
        first = 1 if h0_is_zero else 0
        # h_{t-1} of steps first..L-1: h's sequence shifted by a step (h_0 zero: a view)
        h_prev = outputs[0][:-1] if h0_is_zero else kernel_prevs[0]
        gh = dhp.shape[-1]
        if w_h.ndim == 3:  # per problem: its rows only
            n_prob = w_h.shape[0]
            batch = xp.shape[1] // n_prob
            steps_used = length - first
            if steps_used > 0:
                d = dhp[first:].reshape(steps_used, n_prob, batch, gh).transpose(1, 3, 0, 2)
                h = h_prev.reshape(steps_used, n_prob, batch, hidden).transpose(1, 0, 2, 3)
                d_w_h = d.reshape(n_prob, gh, -1) @ h.reshape(n_prob, -1, hidden)
            else:
                d_w_h = mx.zeros_like(w_h)
            per = [cell.param_grads(dhp[:, k * batch:(k + 1) * batch]) for k in range(n_prob)]
            d_params = tuple(mx.stack(g) for g in zip(*per))
            return (dx.astype(xp.dtype), d_w_h, *d_states0, *d_params)
        if length > first:
            rows = (length - first) * xp.shape[1]
            d_w_h = dhp[first:].reshape(rows, gh).T @ h_prev.reshape(rows, hidden)
        else:
            d_w_h = mx.zeros_like(w_h)
        return (dx.astype(xp.dtype), d_w_h, *d_states0, *cell.param_grads(dhp))

    @backward.vjp
    def backward_vjp(primals, cotangents, outputs):
        raise NotImplementedError(
            "mlx_fastrnn: second-order gradients through the fused recurrence are not "
            "supported. The drop-in and mlx_fastrnn.pytorch layers run stock-style ops under "
            "MLX_RNN_IMPL=legacy (or use_impl('legacy')), flashrnn() with backend='vanilla'; the "
            "multi-head layers have no such path."
        )

    @run.vmap
    def run_vmap(inputs, axes):
        # A vmapped batch of sequences is just a bigger batch: fold the mapped axis
        # into each problem's rows (rows problem-major: problem, map index, row). Mapped
        # weights (or params) make each map index a set of problems of its own: problems
        # (map index, problem), W_h stacked [size * NP, G*H, H], params [size * NP, ...].
        xp, w_h, *rest = inputs
        x_axis, w_axis, *rest_axes = axes
        if varlen is not None:
            raise ValueError("mlx_fastrnn: vmap over a recurrence with lengths inside the kernels is not "
                             "supported; use MLX_RNN_IMPL=legacy (mlx_fastrnn.pytorch layers).")
        size = next(a.shape[ax] for a, ax in zip(inputs, axes) if ax is not None)
        state_axes, param_axes = rest_axes[:n_given], rest_axes[n_given:]
        per_item = w_axis is not None or any(a is not None for a in param_axes)

        def mapped_first(a, ax):  # [size, ...]: the mapped axis first, or a broadcast
            return mx.broadcast_to(a, (size, *a.shape)) if ax is None else mx.moveaxis(a, ax, 0)

        w_dims = [d for i, d in enumerate(w_h.shape) if i != w_axis]  # W_h's own shape
        stacked = len(w_dims) == 3  # NP problems before the map (heads, directions)
        problems = w_dims[0] if stacked else 1

        def rows(a, ax):
            """[size, ..., NP*B, X] (mapped axis first) as the run's rows [..., rows, X]."""
            a = mapped_first(a, ax)
            lead, (n, width) = a.shape[1:-2], a.shape[-2:]
            a = a.reshape(size, *lead, problems, n // problems, width)
            k = len(lead)
            if not per_item:  # (problem, map index, row)
                a = mx.moveaxis(a, 0, k + 1)
            else:  # (map index, problem, row)
                a = mx.moveaxis(a, 0, k)
            return a.reshape(*lead, size * n, width)

        xp = mx.contiguous(rows(xp, x_axis))
        length = xp.shape[0]
        states = [rows(q, ax) for q, ax in zip(rest[:n_given], state_axes)]
        params = rest[n_given:]
        if per_item:
            w_h = mapped_first(w_h, w_axis)
            w_h = mx.contiguous(w_h.reshape(-1, *w_h.shape[-2:]) if stacked else w_h)
            params = tuple(mapped_first(q, ax).reshape(-1, *q.shape[(ax is not None) + stacked:])
                           if stacked else mapped_first(q, ax) for q, ax in zip(params, param_axes))
        outs = run(xp, w_h, *states, *params)
        batch = xp.shape[1] // (size * problems)

        def unfold(o):  # the run's rows back to [L, size, NP*B, X]
            if not per_item:
                o = o.reshape(length, problems, size, batch, o.shape[-1]).swapaxes(1, 2)
            return o.reshape(length, size, problems * batch, o.shape[-1])

        return tuple(unfold(o) for o in outs), (1,) * len(outs)

    return run


def _zero_filled(states, batch, hidden):
    """``states`` with each None (a zero state) as zeros [batch, hidden] float32 (one array)."""
    if all(s is not None for s in states):
        return tuple(states)
    zero = mx.zeros((batch, hidden), mx.float32)
    return tuple(zero if s is None else s for s in states)


def _per_row(params, w_h, rows):
    """Per-problem params ([NP, ...], a stacked ``w_h`` [NP, G*H, H]) as one row each of
    the problem's rows ([rows, ...], problem-major; every step takes params per row,
    see ``Steps``); other params as they are."""
    if w_h.ndim != 3 or not params:
        return params
    return tuple(mx.repeat(p, rows // w_h.shape[0], axis=0) for p in params)


def _backward_by_steps(backward_step, d_outs, xp, hp, prevs, params, w_h, need_d_states0):
    """The generic backward: one fused backward step (and one matmul) per time step."""
    length, batch = xp.shape[0], xp.shape[1]
    xs, hps = split_time(xp), split_time(hp)
    prev_steps = [split_time(p) for p in prevs]
    d_out_steps = [split_time(d) for d in d_outs]
    d_rec = tuple(mx.zeros_like(s[0]) for s in prev_steps)
    dxs, dhps = [None] * length, [None] * length
    for t in reversed(range(length)):
        dx, dhp, direct = backward_step(
            tuple(d[t] for d in d_out_steps),
            d_rec,
            xs[t],
            hps[t],
            tuple(p[t] for p in prev_steps),
            params,
        )
        dxs[t], dhps[t] = dx, dhp
        if t == 0 and not need_d_states0:
            break  # the caller passed no state: its cotangent is not needed
        if direct[0] is not None and w_h.ndim == 2:
            dh = mx.addmm(direct[0], dhp, w_h)
        else:
            dh = per_problem_matmul(dhp, w_h)
            if direct[0] is not None:
                dh = dh + direct[0]
        d_rec = (dh,) + tuple(direct[1:])
    dx = _concat_time(dxs, length, batch)
    dhp = dx if dhps[0] is dxs[0] else _concat_time(dhps, length, batch)
    return dx, dhp, d_rec


def _concat_time(pieces, length, batch):
    """[B, K] pieces -> [L, B, K]."""
    if length == 1:
        return pieces[0][None]
    return mx.concatenate(pieces, axis=0).reshape(length, batch, pieces[0].shape[-1])
