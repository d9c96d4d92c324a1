"""Elman RNN persistent kernels (whole sequence in one launch): the cell's point functions.

``h' = act(x + hp)`` with act = tanh, or relu when the template flag ``RELU`` is
set (``naive.py``). Shared device code and constants:
``mlx_fastrnn.kernels.persistent_header``.
"""


NUM_GATES = 1
NUM_STATES = 1
NUM_PARAMS = 0

# One element's step as device functions (both classes' bodies call them: kernels/tiled.py,
# kernels/resident.py and the LSTM's for the contract); RELU picks the activation.
# The states entering a step that the adjoint reads: none (hp holds all it needs).
PREV_USED = (False,)
DHP_IS_DX = True
POINT_TEMPLATE = "<RELU>"
POINT = r"""
namespace frnn_cell {
template <bool RELU>
__device__ __forceinline__ void forward(const float* x, const float* a, const float* prm, float* s) {
  const float pre = x[0] + a[0];
  s[0] = RELU ? (pre < 0.0f ? 0.0f : pre) : tanhf(pre);  // relu keeps NaN, as mx.maximum
}
template <bool RELU>
__device__ __forceinline__ void backward(const float* x, const float* a, const float* prm, const float* sp,
                                         const float* g, float* dx, float* dhp, float* dprev) {
  const float pre = x[0] + a[0];
  float d;
  if (RELU) {
    d = pre > 0.0f ? g[0] : 0.0f;
  } else {
    const float h = tanhf(pre);
    d = g[0] * (1.0f - h * h);
  }
  dx[0] = d;
  dhp[0] = d;
  dprev[0] = 0.0f;
}
}  // namespace frnn_cell
"""

def template_extras(cell_name):
    """``RELU`` selects the activation."""
    return [("RELU", cell_name == "rnn_relu")]

