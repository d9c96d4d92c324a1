"""The recurrence driver: the time loop of any cell, with a fused backward.

``recurrence`` runs ``cell`` over a time-major sequence of input pre-activations.
It is one ``mx.custom_function`` whose VJP walks time backwards with the cell's
fused backward step and then forms the weight gradient as ONE matmul over the
whole sequence (instead of one small matmul per step, as autodiff of the loop
would). Besides the output sequences only the recurrent projections
``h_{t-1} W_h^T`` are kept for the backward (recomputing them would cost a
third more matmul work, which dominates on the CPU); the gates are recomputed
elementwise by the backward step.
"""

import mlx.core as mx

_FUNCTIONS = {}


def recurrence(cell, steps, xp, w_h, states0, params, h0_is_zero):
    """Run ``cell`` over ``xp``.

    Args:
        cell: a :class:`mlx_fastrnn.cells.Cell`.
        steps: ``(steps_name, forward_step, backward_step)``, the step
            implementation (compiled reference or fused kernels).
        xp: [L, B, G*H] input pre-activations, row contiguous (any float dtype).
        w_h: [G*H, H] float32 recurrent weights.
        states0: initial states, each [B, H] float32.
        params: the cell's extra float32 params (GRU: ``(bhn,)``).
        h0_is_zero: the initial hidden state is zero (the caller passed none),
            so the first recurrent matmul is skipped.

    Returns:
        One [L, B, H] float32 sequence per state.
    """
    return _function(cell, steps, h0_is_zero, len(states0), len(params))(
        xp, w_h, *states0, *params
    )[: cell.num_states]


def _function(cell, steps, h0_is_zero, n_states, n_params):
    key = (cell.name, steps[0], h0_is_zero, n_states, n_params)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        fn = _FUNCTIONS[key] = _make_function(cell, steps[1], steps[2], h0_is_zero)
    return fn


def _split_time(a):
    # One multi-output op instead of L slices; pieces keep a leading axis of 1.
    return mx.split(a, a.shape[0], axis=0) if a.shape[0] > 1 else [a]


def _make_function(cell, forward_step, backward_step, h0_is_zero):
    n = cell.num_states

    def forward(xp, w_h, *rest):
        states = tuple(s[None] for s in rest[:n])
        params = rest[n:]
        w_h_t = w_h.T
        seqs = [[] for _ in range(n)]
        hps = []
        for t, x_t in enumerate(_split_time(xp)):
            if t == 0 and h0_is_zero:
                hp = mx.zeros(x_t.shape, mx.float32)
            else:
                hp = states[0] @ w_h_t
            hps.append(hp)
            states = forward_step(x_t, hp, states, params)
            for seq, s in zip(seqs, states):
                seq.append(s)
        return tuple(mx.concatenate(seq, axis=0) for seq in seqs + [hps])

    @mx.custom_function
    def run(xp, w_h, *rest):
        return forward(xp, w_h, *rest)

    @run.vjp
    def run_vjp(primals, cotangents, outputs):
        xp, w_h, *rest = primals
        states0 = tuple(s[None] for s in rest[:n])
        params = tuple(rest[n:])
        length, hidden = xp.shape[0], w_h.shape[1]

        # The state entering each step.
        prev_seqs = [
            mx.concatenate([s0, seq[:-1]], axis=0) for s0, seq in zip(states0, outputs)
        ]
        xs, hps = _split_time(xp), _split_time(outputs[n])
        prevs = [_split_time(p) for p in prev_seqs]
        d_outs = [_split_time(c) for c in cotangents[:n]]

        d_rec = tuple(mx.zeros_like(s) for s in states0)
        dxs, dhps = [None] * length, [None] * length
        for t in reversed(range(length)):
            dx, dhp, direct = backward_step(
                tuple(d[t] for d in d_outs),
                d_rec,
                xs[t],
                hps[t],
                tuple(p[t] for p in prevs),
                params,
            )
            dxs[t], dhps[t] = dx, dhp
            if t == 0 and h0_is_zero:
                break  # the caller passed no state: its cotangent is not needed
            dh = dhp @ w_h if direct[0] is None else mx.addmm(direct[0], dhp, w_h)
            d_rec = (dh,) + tuple(direct[1:])

        dx_seq = mx.concatenate(dxs, axis=0)
        dhp_seq = mx.concatenate(dhps, axis=0) if dhps[0] is not dxs[0] else dx_seq
        gh = dhp_seq.shape[-1]
        # d W_h = sum_t dhp_t^T h_{t-1}: one matmul over the whole sequence. A zero
        # initial state contributes nothing, so its step is left out.
        first = 1 if h0_is_zero else 0
        if length > first:
            d_w_h = dhp_seq[first:].reshape(-1, gh).T @ prev_seqs[0][first:].reshape(-1, hidden)
        else:
            d_w_h = mx.zeros_like(w_h)
        if h0_is_zero:
            d_states0 = tuple(mx.zeros_like(s[0]) for s in states0)
        else:
            d_states0 = tuple(d[0] for d in d_rec)
        return (dx_seq.astype(xp.dtype), d_w_h, *d_states0, *cell.param_grads(dhp_seq))

    return run
