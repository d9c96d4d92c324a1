"""GRU step kernels: one body each in the common dialect (see kernels/dialect.py),
the same math and operation order as naive.py.

Row b of x/hp holds the gates r, z, n at [b*3H + j], [+H], [+2H]. ``bhn`` is one [H]
vector, or with template ``ROWB`` one row per row of h ([B, H]: the per-problem bhn of a
multi-problem step loop, e.g. a multi-head layer's heads, each row its head's)."""

import mlx.core as mx

from ...kernels.dialect import KernelSource
from ...kernels.launch import operand, run_step, step_shape, vector_operand

_GATES = """
if (gid >= dims[0] * H) {
  return;
}
const int b = gid / H;
const int j = gid - b * H;
const int g = b * (3 * H) + j;
const float r = rnn_sigmoid(static_cast<float>(x[g]) + static_cast<float>(hp[g]));
const float z = rnn_sigmoid(static_cast<float>(x[g + H]) + static_cast<float>(hp[g + H]));
const float hn = static_cast<float>(hp[g + 2 * H]) + static_cast<float>(bhn[ROWB ? gid : j]);
const float n = rnn_tanh(static_cast<float>(x[g + 2 * H]) + r * hn);
"""

FORWARD = KernelSource(
    name="gru_forward",
    input_names=("dims", "x", "hp", "h", "bhn"),
    output_names=("h_out",),
    body=_GATES + """
h_out[gid] = static_cast<TS>((1.0f - z) * n + z * static_cast<float>(h[gid]));
""",
    template_names=("T", "TS", "H", "ROWB"),
)

BACKWARD = KernelSource(
    name="gru_backward",
    input_names=("dims", "dh_out", "dh_rec", "x", "hp", "h", "bhn"),
    output_names=("dx", "dhp", "dh_direct"),
    body=_GATES + """
const float dh = static_cast<float>(dh_out[gid]) + static_cast<float>(dh_rec[gid]);
const float dn = dh * (1.0f - z) * (1.0f - n * n);
const float dz = dh * (static_cast<float>(h[gid]) - n) * z * (1.0f - z);
const float dr = dn * hn * r * (1.0f - r);
dx[g] = static_cast<TS>(dr);
dx[g + H] = static_cast<TS>(dz);
dx[g + 2 * H] = static_cast<TS>(dn);
dhp[g] = static_cast<TS>(dr);
dhp[g + H] = static_cast<TS>(dz);
dhp[g + 2 * H] = static_cast<TS>(dn * r);
dh_direct[gid] = static_cast<TS>(dh * z);
""",
    template_names=("T", "TS", "H", "ROWB"),
)


def _bhn(bhn, sh, H, dtype):
    """``(operand, template)``: bhn per unit ([H], or anything of H elements) or per row
    ([*lead, H]: template ROWB)."""
    if bhn is not None and bhn.size != H:
        return operand(bhn, sh, H, dtype), (("ROWB", 1),)
    return vector_operand(bhn, H, dtype), (("ROWB", 0),)


def forward_step(x, hp, states, params, *, target, dtype=mx.float32):
    """:func:`..naive.forward_step` on a fused kernel; returns ``(h',)``.
    Operands other than ``x`` and the result are of ``dtype`` (float32 math inside)."""
    (h,), (bhn,) = states, params
    sh = step_shape(x, 3)
    H = sh.hidden
    bhn, rowb = _bhn(bhn, sh, H, dtype)
    (h_out,) = run_step(FORWARD, target, sh,
                        [sh.x, operand(hp, sh, 3 * H, dtype), operand(h, sh, H, dtype), bhn],
                        [H], rowb, dtype=dtype)
    return (h_out,)


def backward_step(d_out, d_rec, x, hp, states, params, *, target, dtype=mx.float32):
    """:func:`..naive.backward_step` on a fused kernel; returns ``(dx, dhp, (dh_direct,))``."""
    (h,), (bhn,) = states, params
    sh = step_shape(x, 3)
    H = sh.hidden
    bhn, rowb = _bhn(bhn, sh, H, dtype)
    dx, dhp, dh_direct = run_step(
        BACKWARD, target, sh,
        [operand(d_out[0], sh, H, dtype), operand(d_rec[0], sh, H, dtype), sh.x,
         operand(hp, sh, 3 * H, dtype), operand(h, sh, H, dtype), bhn],
        [3 * H, 3 * H, H], rowb, dtype=dtype)
    return dx, dhp, (dh_direct,)
