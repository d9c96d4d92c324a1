"""GRU persistent kernels (whole sequence in one launch): the cell's point functions.

The math is ``naive.py``'s (gate order r, z, n; ``n = tanh(x_n + r*(hp_n + bhn))``).
Shared device code (barrier, W_h slice, projection) is in
``mlx_fastrnn.kernels.persistent_header``; constants are documented there.
"""


NUM_GATES = 3
NUM_STATES = 1
NUM_PARAMS = 1  # bhn

# One element's step as device functions (both classes' bodies call them: kernels/tiled.py,
# kernels/resident.py and the LSTM's for the contract): gates r, z, n; prm[0]
# is b_hn; s = (h,). dhp differs from dx in the n gate (r scales hp_n).
# The states entering a step that the adjoint reads: h (the update gate's z * h_prev).
PREV_USED = (True,)
DHP_IS_DX = False
POINT = r"""
namespace frnn_cell {
__device__ __forceinline__ void forward(const float* x, const float* a, const float* prm, float* s) {
  const float rg = frnn::sigmoid(x[0] + a[0]);
  const float zg = frnn::sigmoid(x[1] + a[1]);
  const float ng = tanhf(x[2] + rg * (a[2] + prm[0]));
  s[0] = (1.0f - zg) * ng + zg * s[0];
}
__device__ __forceinline__ void backward(const float* x, const float* a, const float* prm, const float* sp,
                                         const float* g, float* dx, float* dhp, float* dprev) {
  const float rg = frnn::sigmoid(x[0] + a[0]);
  const float zg = frnn::sigmoid(x[1] + a[1]);
  const float hn = a[2] + prm[0];
  const float ng = tanhf(x[2] + rg * hn);
  const float dn = g[0] * (1.0f - zg) * (1.0f - ng * ng);
  const float dz = g[0] * (sp[0] - ng) * zg * (1.0f - zg);
  const float dr = dn * hn * rg * (1.0f - rg);
  dx[0] = dr;
  dx[1] = dz;
  dx[2] = dn;
  dhp[0] = dr;
  dhp[1] = dz;
  dhp[2] = dn * rg;
  dprev[0] = g[0] * zg;
}
}  // namespace frnn_cell
"""

def template_extras(cell_name):
    """Cell-specific template arguments (none for GRU)."""
    return []

