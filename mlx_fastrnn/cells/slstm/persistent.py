"""sLSTM persistent kernels (whole sequence in one launch): the cell's point functions.

The math is ``naive.py``'s (gate order i, f, z, o; states y, c, n, m; the
stabilizer m, the normalizer n clamped at 1, the fresh-state rule per element,
a fresh step's forget gate capped at e^EXP_CAP, torch's half-and-half max
ties in the adjoint). Only y recurs through W_h (the block's projection, as
the LSTM's h); c, n and m never leave the block that owns their units, so they
are carried in registers across steps (and written out per step for the
backward). Shared device code and constants: ``mlx_fastrnn.kernels.persistent_header``.
"""

from .naive import EXP_CAP

NUM_GATES = 4
NUM_STATES = 4
NUM_PARAMS = 0
# Elements per thread: four carried states, and in the backward their cotangents too.
# NVRTC 13.0, 128 registers (2026-12-04, H200 plans of 8-16 heads of 128-256 at B = 64):
# at four elements the forward spills 12-28 bytes, as the LSTM's tensor-core forward
# does at four (8-28), the backward 132-396; at two the backward spills nothing.
MAX_EPT = 4
MAX_EPT_BACKWARD = 2

# The forward step of one element from its gate pre-activations (ir, fr, zr,
# orw) and previous (cp, np_, mp): the same operations as the step kernels
# (cells/slstm/kernels.py), with the CUDA math library's log1pf for the
# log-sigmoid. Every comparison lets NaN through, as naive.py's max/min do.
_STEP = r"""
          const float lf = (fr > 0.0f ? 0.0f : fr) - log1pf(expf(-fabsf(fr))) + mp;
          const bool fresh = np_ == 0.0f;
          const float mn = fresh ? ir : ((ir != ir || ir > lf) ? ir : lf);
          const float ig = expf(ir - mn);
          const float fd = lf - mn;
          const bool capped = fd > EXP_CAP;
          const float fg = expf(capped ? EXP_CAP : fd);
          const float tz = tanhf(zr);
          const float og = frnn::sigmoid(orw);
          const float cn = fg * cp + ig * tz;
          const float u = fg * np_ + ig;
          const float nn = u < 1.0f ? 1.0f : u;
          const float yn = og * cn / nn;
""".replace("EXP_CAP", repr(float(EXP_CAP)) + "f")

# One element's step as device functions (both classes' bodies call them: kernels/tiled.py,
# kernels/resident.py and the LSTM's for the contract): s = (y, c, n, m).
# The states entering a step that the adjoint reads: c, n, m (y only recurs through hp).
PREV_USED = (False, True, True, True)
DHP_IS_DX = True
# The step from a point function's arguments (SP: the name of its state array).
_POINT_STEP = r"""  const float ir = x[0] + a[0];
  const float fr = x[1] + a[1];
  const float zr = x[2] + a[2];
  const float orw = x[3] + a[3];
  const float cp = SP[1];
  const float np_ = SP[2];
  const float mp = SP[3];
""" + _STEP
POINT = r"""
namespace frnn_cell {
__device__ __forceinline__ void forward(const float* x, const float* a, const float* prm, float* s) {
""" + _POINT_STEP.replace("SP", "s") + r"""
  s[0] = yn;
  s[1] = cn;
  s[2] = nn;
  s[3] = mn;
}
__device__ __forceinline__ void backward(const float* x, const float* a, const float* prm, const float* sp,
                                         const float* g, float* dx, float* dhp, float* dprev) {
""" + _POINT_STEP.replace("SP", "sp") + r"""
  // The adjoint of naive._adjoint; wu / wi are the tie weights (1/2 at a tie).
  const float gy = g[0];
  const float gm = g[3];
  const float fdv = capped ? 0.0f : fg;
  const float wu = u < 1.0f ? 0.0f : (u == 1.0f ? 0.5f : 1.0f);
  const float wi = fresh ? 1.0f : (ir < lf ? 0.0f : (ir == lf ? 0.5f : 1.0f));
  const float g_c = g[1] + gy * (og / nn);
  const float g_u = (g[2] - gy * (yn / nn)) * wu;
  const float di = g_c * (tz * ig) + g_u * ig;
  const float df = g_c * (cp * fdv) + g_u * (np_ * fdv);
  const float d_lf = wi * df + (1.0f - wi) * (gm - di);
  dx[0] = wi * (gm - df) + (1.0f - wi) * di;
  dx[1] = d_lf * frnn::sigmoid(-fr);
  dx[2] = g_c * (ig * (1.0f - tz * tz));
  dx[3] = gy * ((cn / nn) * og * (1.0f - og));
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    dhp[k] = dx[k];
  }
  dprev[0] = 0.0f;
  dprev[1] = g_c * fg;
  dprev[2] = g_u * fg;
  dprev[3] = d_lf;
}
}  // namespace frnn_cell
"""

def template_extras(cell_name):
    """Cell-specific template arguments (none for sLSTM)."""
    return []

