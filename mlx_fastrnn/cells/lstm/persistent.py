"""LSTM persistent kernels (whole sequence in one launch): the cell's point functions.

The math is ``naive.py``'s (gate order i, f, g, o; ``c' = f c + i g``,
``h' = o tanh(c')``). The cell state never leaves the block that owns its
units, so it is carried in registers across steps (and written out per step).
Shared device code and constants: ``mlx_fastrnn.kernels.persistent_header``.
"""


NUM_GATES = 4
NUM_STATES = 2
NUM_PARAMS = 0

# One element's step as device functions (both classes' bodies call them: kernels/tiled.py,
# kernels/resident.py): x / a the input / recurrent pre-activations (i, f, g, o),
# s = (h, c) updated in place. The adjoint gets the states entering the step
# (sp), the cotangents of the states it made (g) and returns the
# pre-activations' cotangents (dx; dhp is the same) and the entering states'
# cotangents through the cell's direct paths (dprev; h's recurrence is the caller's).
# The states entering a step that the adjoint reads: c only.
PREV_USED = (False, True)
DHP_IS_DX = True
POINT = r"""
namespace frnn_cell {
__device__ __forceinline__ void forward(const float* x, const float* a, const float* prm, float* s) {
  const float ig = frnn::sigmoid(x[0] + a[0]);
  const float fg = frnn::sigmoid(x[1] + a[1]);
  const float gg = tanhf(x[2] + a[2]);
  const float og = frnn::sigmoid(x[3] + a[3]);
  const float c = fg * s[1] + ig * gg;
  s[1] = c;
  s[0] = og * tanhf(c);
}
__device__ __forceinline__ void backward(const float* x, const float* a, const float* prm, const float* sp,
                                         const float* g, float* dx, float* dhp, float* dprev) {
  const float ig = frnn::sigmoid(x[0] + a[0]);
  const float fg = frnn::sigmoid(x[1] + a[1]);
  const float gg = tanhf(x[2] + a[2]);
  const float og = frnn::sigmoid(x[3] + a[3]);
  const float cp = sp[1];
  const float tc = tanhf(fg * cp + ig * gg);
  const float gc = g[1] + g[0] * og * (1.0f - tc * tc);
  dx[0] = gc * gg * ig * (1.0f - ig);
  dx[1] = gc * cp * fg * (1.0f - fg);
  dx[2] = gc * ig * (1.0f - gg * gg);
  dx[3] = g[0] * tc * og * (1.0f - og);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    dhp[k] = dx[k];
  }
  dprev[0] = 0.0f;
  dprev[1] = gc * fg;
}
}  // namespace frnn_cell
"""

def template_extras(cell_name):
    """Cell-specific template arguments (none for LSTM)."""
    return []

