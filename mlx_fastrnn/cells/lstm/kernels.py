"""LSTM step kernels: one body each in the common dialect (see kernels/dialect.py),
the same math and operation order as naive.py.

Row b of x/hp holds the gates i, f, g, o at [b*4H + j], [+H], [+2H], [+3H]."""

import mlx.core as mx

from ...kernels.dialect import KernelSource
from ...kernels.launch import operand, run_step, step_shape

_GATES = """
if (gid >= dims[0] * H) {
  return;
}
const int b = gid / H;
const int j = gid - b * H;
const int k = b * (4 * H) + j;
const float gi = rnn_sigmoid(static_cast<float>(x[k]) + static_cast<float>(hp[k]));
const float gf = rnn_sigmoid(static_cast<float>(x[k + H]) + static_cast<float>(hp[k + H]));
const float gg = rnn_tanh(static_cast<float>(x[k + 2 * H]) + static_cast<float>(hp[k + 2 * H]));
const float go = rnn_sigmoid(static_cast<float>(x[k + 3 * H]) + static_cast<float>(hp[k + 3 * H]));
const float cp = static_cast<float>(c[gid]);
"""

FORWARD = KernelSource(
    name="lstm_forward",
    input_names=("dims", "x", "hp", "c"),
    output_names=("h_out", "c_out"),
    body=_GATES + """
const float cn = gf * cp + gi * gg;
c_out[gid] = static_cast<TS>(cn);
h_out[gid] = static_cast<TS>(go * rnn_tanh(cn));
""",
    template_names=("T", "TS", "H"),
)

BACKWARD = KernelSource(
    name="lstm_backward",
    input_names=("dims", "dh_out", "dh_rec", "dc_out", "dc_rec", "x", "hp", "c"),
    output_names=("dgates", "dc_prev"),
    body=_GATES + """
const float dh = static_cast<float>(dh_out[gid]) + static_cast<float>(dh_rec[gid]);
const float tc = rnn_tanh(gf * cp + gi * gg);
const float dc = static_cast<float>(dc_out[gid]) + static_cast<float>(dc_rec[gid]) + dh * go * (1.0f - tc * tc);
dgates[k] = static_cast<TS>(dc * gg * gi * (1.0f - gi));
dgates[k + H] = static_cast<TS>(dc * cp * gf * (1.0f - gf));
dgates[k + 2 * H] = static_cast<TS>(dc * gi * (1.0f - gg * gg));
dgates[k + 3 * H] = static_cast<TS>(dh * tc * go * (1.0f - go));
dc_prev[gid] = static_cast<TS>(dc * gf);
""",
    template_names=("T", "TS", "H"),
)


def forward_step(x, hp, states, params, *, target, dtype=mx.float32):
    """:func:`..naive.forward_step` on a fused kernel; returns ``(h', c')``.
    Operands other than ``x`` and the results are of ``dtype`` (float32 math inside)."""
    _, c = states
    sh = step_shape(x, 4)
    H = sh.hidden
    h_out, c_out = run_step(FORWARD, target, sh,
                            [sh.x, operand(hp, sh, 4 * H, dtype), operand(c, sh, H, dtype)], [H, H],
                            dtype=dtype)
    return h_out, c_out


def backward_step(d_out, d_rec, x, hp, states, params, *, target, dtype=mx.float32):
    """:func:`..naive.backward_step` on a fused kernel; returns
    ``(dgates, dgates, (None, dc_prev))``."""
    _, c = states
    sh = step_shape(x, 4)
    H = sh.hidden
    dgates, dc_prev = run_step(
        BACKWARD, target, sh,
        [operand(d_out[0], sh, H, dtype), operand(d_rec[0], sh, H, dtype),
         operand(d_out[1], sh, H, dtype), operand(d_rec[1], sh, H, dtype),
         sh.x, operand(hp, sh, 4 * H, dtype), operand(c, sh, H, dtype)],
        [4 * H, H], dtype=dtype)
    return dgates, dgates, (None, dc_prev)
