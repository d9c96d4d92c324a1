"""sLSTM step kernels: one body each in the common dialect (see kernels/dialect.py),
the same math and operation order as naive.py (its docstring has the formulas,
the overflow cap and the tie rules).

Row b of x/hp holds the gates i, f, z, o at [b*4H + j], [+H], [+2H], [+3H].

The dialect has no logarithm (and no per-target spelling of one may appear in
a body), so log1p for the log-sigmoid is a short series of plain arithmetic:
log1p(e) = 2 atanh(s), s = e / (2 + e) in [0, 1/3] for e = exp(-|v|) in [0, 1];
the odd series to s^15 leaves a truncation error below 2e-9, and the result
is within a few float32 ulp of log1p (checked against float64 in the tests).
Every max/min is written so that NaN passes through (``a != a`` is the NaN test).
"""

import mlx.core as mx

from ...kernels.dialect import KernelSource
from ...kernels.launch import operand, run_step, step_shape
from .naive import EXP_CAP

_STEP = """
if (gid >= dims[0] * H) {
  return;
}
const int b = gid / H;
const int j = gid - b * H;
const int k = b * (4 * H) + j;
const float ir = static_cast<float>(x[k]) + static_cast<float>(hp[k]);
const float fr = static_cast<float>(x[k + H]) + static_cast<float>(hp[k + H]);
const float zr = static_cast<float>(x[k + 2 * H]) + static_cast<float>(hp[k + 2 * H]);
const float orw = static_cast<float>(x[k + 3 * H]) + static_cast<float>(hp[k + 3 * H]);
const float cp = static_cast<float>(c[gid]);
const float np = static_cast<float>(n[gid]);
const float mp = static_cast<float>(m[gid]);
// log_sigmoid(fr) = min(fr, 0) - log1p(exp(-|fr|)), log1p by its atanh series
const float ls_e = rnn_exp(fr > 0.0f ? -fr : fr);
const float ls_s = ls_e / (2.0f + ls_e);
const float ls_s2 = ls_s * ls_s;
float ls_p = 2.0f / 15.0f;
ls_p = 2.0f / 13.0f + ls_s2 * ls_p;
ls_p = 2.0f / 11.0f + ls_s2 * ls_p;
ls_p = 2.0f / 9.0f + ls_s2 * ls_p;
ls_p = 2.0f / 7.0f + ls_s2 * ls_p;
ls_p = 2.0f / 5.0f + ls_s2 * ls_p;
ls_p = 2.0f / 3.0f + ls_s2 * ls_p;
ls_p = 2.0f + ls_s2 * ls_p;
const float lf = (fr > 0.0f ? 0.0f : fr) - ls_s * ls_p + mp;
const bool fresh = np == 0.0f;
const float mn = fresh ? ir : ((ir != ir || ir > lf) ? ir : lf);
const float ig = rnn_exp(ir - mn);
const float fd = lf - mn;
const bool capped = fd > EXP_CAP;
const float fg = rnn_exp(capped ? EXP_CAP : fd);
const float tz = rnn_tanh(zr);
const float og = rnn_sigmoid(orw);
const float cn = fg * cp + ig * tz;
const float u = fg * np + ig;
const float nn = u < 1.0f ? 1.0f : u;
const float yn = og * cn / nn;
""".replace("EXP_CAP", repr(float(EXP_CAP)) + "f")

FORWARD = KernelSource(
    name="slstm_forward",
    input_names=("dims", "x", "hp", "c", "n", "m"),
    output_names=("y_out", "c_out", "n_out", "m_out"),
    body=_STEP + """
y_out[gid] = static_cast<TS>(yn);
c_out[gid] = static_cast<TS>(cn);
n_out[gid] = static_cast<TS>(nn);
m_out[gid] = static_cast<TS>(mn);
""",
    template_names=("T", "TS", "H"),
)

# The adjoint as in naive._adjoint; wu / wi are the tie weights (1/2 at a tie).
BACKWARD = KernelSource(
    name="slstm_backward",
    input_names=("dims", "dy_out", "dy_rec", "dc_out", "dc_rec", "dn_out", "dn_rec",
                 "dm_out", "dm_rec", "x", "hp", "c", "n", "m"),
    output_names=("dgates", "dc_prev", "dn_prev", "dm_prev"),
    body=_STEP + """
const float gy = static_cast<float>(dy_out[gid]) + static_cast<float>(dy_rec[gid]);
const float gc = static_cast<float>(dc_out[gid]) + static_cast<float>(dc_rec[gid]);
const float gn = static_cast<float>(dn_out[gid]) + static_cast<float>(dn_rec[gid]);
const float gm = static_cast<float>(dm_out[gid]) + static_cast<float>(dm_rec[gid]);
const float fdv = capped ? 0.0f : fg;
const float wu = u < 1.0f ? 0.0f : (u == 1.0f ? 0.5f : 1.0f);
const float wi = fresh ? 1.0f : (ir < lf ? 0.0f : (ir == lf ? 0.5f : 1.0f));
const float g_c = gc + gy * (og / nn);
const float g_u = (gn - gy * (yn / nn)) * wu;
const float di = g_c * (tz * ig) + g_u * ig;
const float df = g_c * (cp * fdv) + g_u * (np * fdv);
const float d_lf = wi * df + (1.0f - wi) * (gm - di);
dgates[k] = static_cast<TS>(wi * (gm - df) + (1.0f - wi) * di);
dgates[k + H] = static_cast<TS>(d_lf * rnn_sigmoid(-fr));
dgates[k + 2 * H] = static_cast<TS>(g_c * (ig * (1.0f - tz * tz)));
dgates[k + 3 * H] = static_cast<TS>(gy * ((cn / nn) * og * (1.0f - og)));
dc_prev[gid] = static_cast<TS>(g_c * fg);
dn_prev[gid] = static_cast<TS>(g_u * fg);
dm_prev[gid] = static_cast<TS>(d_lf);
""",
    template_names=("T", "TS", "H"),
)


def forward_step(x, hp, states, params, *, target, dtype=mx.float32):
    """:func:`..naive.forward_step` on a fused kernel; returns ``(y', c', n', m')``.
    Operands other than ``x`` and the results are of ``dtype`` (float32 math inside)."""
    _, c, n, m = states
    sh = step_shape(x, 4)
    H = sh.hidden
    return tuple(run_step(
        FORWARD, target, sh,
        [sh.x, operand(hp, sh, 4 * H, dtype), operand(c, sh, H, dtype),
         operand(n, sh, H, dtype), operand(m, sh, H, dtype)],
        [H, H, H, H], dtype=dtype))


def backward_step(d_out, d_rec, x, hp, states, params, *, target, dtype=mx.float32):
    """:func:`..naive.backward_step` on a fused kernel; returns
    ``(dgates, dgates, (None, dc_prev, dn_prev, dm_prev))``."""
    _, c, n, m = states
    sh = step_shape(x, 4)
    H = sh.hidden
    grads = []
    for out, rec in zip(d_out, d_rec):
        grads += [operand(out, sh, H, dtype), operand(rec, sh, H, dtype)]
    dgates, dc, dn, dm = run_step(
        BACKWARD, target, sh,
        [*grads, sh.x, operand(hp, sh, 4 * H, dtype), operand(c, sh, H, dtype),
         operand(n, sh, H, dtype), operand(m, sh, H, dtype)],
        [4 * H, H, H, H], dtype=dtype)
    return dgates, dgates, (None, dc, dn, dm)
