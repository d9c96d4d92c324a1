"""sLSTM step in plain MLX ops: the reference every sLSTM kernel is tested against.

FlashRNN 1.0.8's formulation (``flashrnn/vanilla/slstm.py``), one head, dense
recurrence. Shapes (any leading batch axes ``...``; ``H`` hidden size):
  x       [..., 4H]  input pre-activations ``x W_x^T + b``, gate order i, f, z, o (any float dtype)
  hp      [..., 4H]  recurrent projection ``y W_h^T`` (float32)
  y,c,n,m [..., H]   previous output, cell, normalizer and stabilizer (float32)

    lf = log_sigmoid(f_raw) + m                    (the forget gate in log space)
    m' = i_raw where n == 0 (a fresh state: nothing to stabilize against),
         max(i_raw, lf) elsewhere
    i  = exp(i_raw - m')   f = exp(min(lf - m', EXP_CAP))
    c' = f c + i tanh(z_raw)   n' = max(f n + i, 1)   y' = sigmoid(o_raw) c' / n'

Numerical safety: m' >= i_raw and, unless fresh, m' >= lf, so both exponents are
<= 0 and nothing overflows for any finite input. A fresh step has m' = i_raw
only, so ``lf - m'`` may be large; FlashRNN's vanilla code then overflows f to
inf and ``inf * 0`` makes the zero state NaN. EXP_CAP (e^88 < float32's max)
keeps f finite; it changes nothing where vanilla's float32 f is finite below
e^88. NaN propagates (every max and min here passes NaN through).

Ties: max is not differentiable where its arguments are equal. FlashRNN's
vanilla backend is differentiated by torch autograd, whose max/maximum gives
each argument HALF the cotangent at a tie; we do the same (:func:`tie_maximum`):
- ``m' = max(i_raw, lf)`` at ``i_raw == lf``: half to each;
- ``n' = max(u, 1)`` at ``u == 1``: half to ``u``. Every fresh step from n = 0 is
  such a tie (``u = f * 0 + exp(0) = 1``), so this is not a corner case;
- fresh: m' = i_raw, all of m''s cotangent to i_raw (torch.where's rule).

The fresh test here is per element (as FlashRNN's CUDA and Triton kernels do);
its vanilla code tests ``torch.all(n == 0)`` over the whole state tensor (every
row, head and unit): :func:`step` takes the test as an argument, and
ops/flashrnn.py passes that one.
"""

from typing import NamedTuple

import mlx.core as mx

from ..timeaxis import f32, per_problem_matmul, split_time

EXP_CAP = 88.0


@mx.custom_function
def tie_maximum(a, b):
    """``mx.maximum`` (NaN propagates) whose VJP splits the cotangent at ties,
    as torch.maximum's does (mx.maximum gives it all to ``b``)."""
    return mx.maximum(a, b)


@tie_maximum.vjp
def _tie_maximum_vjp(primals, cotangent, output):
    a, b = primals
    weight = _tie_weight(a, b)  # 1 where a wins, 1/2 at a tie
    return _unbroadcast(cotangent * weight, a.shape), _unbroadcast(cotangent * (1 - weight), b.shape)


@tie_maximum.jvp
def _tie_maximum_jvp(primals, tangents):
    a, b = primals
    weight = _tie_weight(a, b)
    # a constant operand (the normalizer's max(u, 1)) has no tangent: None
    parts = [t * w for t, w in ((tangents[0], weight), (tangents[1], 1 - weight)) if t is not None]
    return (parts[0] if len(parts) == 1 else parts[0] + parts[1],)


def _tie_weight(a, b):
    """d max(a, b) / da: 1 where a > b (and where either is NaN), 1/2 at a tie, 0 where a < b."""
    return mx.where(a < b, 0.0, mx.where(a == b, 0.5, 1.0))


def _unbroadcast(g, shape):
    if tuple(g.shape) == tuple(shape):
        return g
    extra = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(extra))) if extra else g
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def log_sigmoid(v):
    """``log(sigmoid(v)) = min(v, 0) - log1p(exp(-|v|))``: finite for any finite v."""
    return mx.minimum(v, 0.0) - mx.log1p(mx.exp(-mx.abs(v)))


def step(x, hp, states, fresh):
    """One step with the fresh test given (``fresh``: bool, broadcasts to [..., H]).
    Returns ``(y', c', n', m')``."""
    _, c, n, m = states
    i_raw, f_raw, z_raw, o_raw = mx.split(f32(x) + hp, 4, axis=-1)
    lf = log_sigmoid(f_raw) + m
    m_new = mx.where(fresh, i_raw, tie_maximum(i_raw, lf))
    i = mx.exp(i_raw - m_new)
    d = lf - m_new
    f = mx.exp(mx.where(d > EXP_CAP, EXP_CAP, d))
    c_new = f * c + i * mx.tanh(z_raw)
    n_new = tie_maximum(f * n + i, mx.array(1.0))
    return mx.sigmoid(o_raw) * c_new / n_new, c_new, n_new, m_new


def forward_step(x, hp, states, params):
    """One time step. ``states = (y, c, n, m)``, ``params = ()``; returns ``(y', c', n', m')``."""
    return step(x, hp, states, states[2] == 0)


class _Coefs(NamedTuple):
    """What the adjoint of one step needs, recomputed from its inputs."""

    kc: mx.array  # dy'/dc' = o / n'
    kn: mx.array  # -dy'/dn' = y' / n'
    ko: mx.array  # dy'/do_raw = (c'/n') o (1 - o)
    kz: mx.array  # dc'/dz_raw = i (1 - tanh(z)^2)
    wu: mx.array  # dn'/du (tie rule)
    tzi: mx.array  # tanh(z) i: dc'/di * di/di_raw
    i: mx.array  # du/di * di/di_raw
    cf: mx.array  # c f': dc'/df * df/d(lf - m')  (f' = f, 0 where capped)
    nf: mx.array  # n f'
    wi: mx.array  # the share of m''s cotangent that goes to i_raw
    sf: mx.array  # d log_sigmoid(f_raw) / d f_raw = sigmoid(-f_raw)
    f: mx.array  # dc'/dc = du/dn


def _coefficients(x, hp, c, n, m):
    i_raw, f_raw, z_raw, o_raw = mx.split(f32(x) + hp, 4, axis=-1)
    fresh = n == 0
    lf = log_sigmoid(f_raw) + m
    m_new = mx.where(fresh, i_raw, mx.maximum(i_raw, lf))
    i = mx.exp(i_raw - m_new)
    d = lf - m_new
    capped = d > EXP_CAP
    f = mx.exp(mx.where(capped, EXP_CAP, d))
    tz = mx.tanh(z_raw)
    o = mx.sigmoid(o_raw)
    c_new = f * c + i * tz
    u = f * n + i
    n_new = mx.maximum(u, 1.0)
    y_new = o * c_new / n_new
    fd = mx.where(capped, 0.0, f)
    return _Coefs(
        kc=o / n_new, kn=y_new / n_new, ko=(c_new / n_new) * o * (1 - o), kz=i * (1 - tz * tz),
        wu=_tie_weight(u, 1.0), tzi=tz * i, i=i, cf=c * fd, nf=n * fd,
        wi=mx.where(fresh, 1.0, _tie_weight(i_raw, lf)), sf=mx.sigmoid(-f_raw), f=f,
    )


def _adjoint(k, gy, gc, gn, gm):
    """One step's adjoint from the total cotangents of (y', c', n', m').
    Returns ``(dgates, dc, dn, dm)``: the gate pre-activations' cotangent
    [..., 4H] and the direct parts of the previous c, n, m."""
    g_c = gc + gy * k.kc  # total cotangent of c'
    g_u = (gn - gy * k.kn) * k.wu  # of u = f n + i
    di = g_c * k.tzi + g_u * k.i  # of i_raw through i, and of -m'
    df = g_c * k.cf + g_u * k.nf  # of lf through f, and of -m'
    # m''s total cotangent gm - di - df goes wi to i_raw, 1 - wi to lf. Written
    # out so that nothing cancels: wi = 1 (fresh, or i_raw > lf) gives
    # d_i = gm - df, d_lf = df, where di + (gm - di - df) would lose di's digits.
    d_i = k.wi * (gm - df) + (1 - k.wi) * di
    d_lf = k.wi * df + (1 - k.wi) * (gm - di)
    dgates = mx.concatenate([d_i, d_lf * k.sf, g_c * k.kz, gy * k.ko], axis=-1)
    return dgates, g_c * k.f, g_u * k.f, d_lf


def backward_step(d_out, d_rec, x, hp, states, params):
    """Adjoint of :func:`forward_step`, recomputing the step from its inputs.

    ``d_out`` = cotangents of this step's ``(y', c', n', m')``, ``d_rec`` the
    ones from step t+1. Returns ``(dx, dhp, direct)`` with ``dx == dhp`` and
    ``direct = (None, dc, dn, dm)``: y reaches the previous step only through
    ``hp`` (``dy = dhp @ W_h``), c, n and m directly.
    """
    _, c, n, m = states
    gy, gc, gn, gm = (a + b for a, b in zip(d_out, d_rec))
    dgates, dc, dn, dm = _adjoint(_coefficients(x, hp, c, n, m), gy, gc, gn, gm)
    return dgates, dgates, (None, dc, dn, dm)


def backward_sequence(d_outs, x, hp, prevs, params, w_h, need_d_state0):
    """Adjoint of the whole sequence, the CPU way (see gru.naive.backward_sequence):
    the coefficients for all t at once, then a loop that carries
    ``dy_{t-1} = d_out + dgates_t @ W_h`` and the direct c, n, m cotangents."""
    (_, c, n, m), length = prevs, x.shape[0]
    coefs = [split_time(a) for a in _coefficients(x, hp, c, n, m)]
    d_seq = [split_time(d) for d in d_outs]
    dgs = [None] * length
    rec = None
    for t in reversed(range(length)):
        g = [d[t] for d in d_seq]
        if rec is not None:
            g = [a + b for a, b in zip(g, rec)]
        dgates, dc, dn, dm = _adjoint(_Coefs(*(k[t] for k in coefs)), *g)
        dgs[t] = dgates
        if t == 0 and not need_d_state0:
            break
        rec = (per_problem_matmul(dgates, w_h), dc, dn, dm)
    dgates = mx.concatenate(dgs, axis=0).reshape(length, x.shape[1], -1) if length > 1 else dgs[0][None]
    return dgates, dgates, (rec if need_d_state0 else None)
