"""Elman RNN step kernels: one body each in the common dialect (see
kernels/dialect.py), the same math as naive.py; template ``RELU`` picks the
activation (relu, else tanh)."""

from ...kernels.dialect import KernelSource
from ...kernels.launch import operand, run_step, step_shape

_PRE = """
if (gid >= dims[0] * H) {
  return;
}
const float pre = static_cast<float>(x[gid]) + static_cast<float>(hp[gid]);
"""

FORWARD = KernelSource(
    name="rnn_forward",
    input_names=("dims", "x", "hp"),
    output_names=("h_out",),
    body=_PRE + """
if (RELU) {
  h_out[gid] = static_cast<TS>(rnn_relu(pre));
} else {
  h_out[gid] = static_cast<TS>(rnn_tanh(pre));
}
""",
    template_names=("T", "TS", "H", "RELU"),
)

BACKWARD = KernelSource(
    name="rnn_backward",
    input_names=("dims", "dh_out", "dh_rec", "x", "hp"),
    output_names=("dpre",),
    body=_PRE + """
const float dh = static_cast<float>(dh_out[gid]) + static_cast<float>(dh_rec[gid]);
if (RELU) {
  dpre[gid] = static_cast<TS>(pre > 0.0f ? dh : 0.0f);
} else {
  const float t = rnn_tanh(pre);
  dpre[gid] = static_cast<TS>(dh * (1.0f - t * t));
}
""",
    template_names=("T", "TS", "H", "RELU"),
)


def forward_step(x, hp, states, params, relu=False, *, target):
    """:func:`..naive.forward_step` on a fused kernel; returns ``(h',)``."""
    sh = step_shape(x, 1)
    H = sh.hidden
    (h_out,) = run_step(FORWARD, target, sh, [sh.x, operand(hp, sh, H)], [H],
                        [("RELU", bool(relu))])
    return (h_out,)


def backward_step(d_out, d_rec, x, hp, states, params, relu=False, *, target):
    """:func:`..naive.backward_step` on a fused kernel; returns ``(dpre, dpre, (None,))``."""
    sh = step_shape(x, 1)
    H = sh.hidden
    (dpre,) = run_step(
        BACKWARD, target, sh,
        [operand(d_out[0], sh, H), operand(d_rec[0], sh, H), sh.x, operand(hp, sh, H)],
        [H], [("RELU", bool(relu))])
    return dpre, dpre, (None,)
