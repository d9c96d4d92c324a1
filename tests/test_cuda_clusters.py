"""Thread-block clusters through ``mx.fast.cuda_kernel`` (issue 12's latency class).

MLX 0.32's ``CustomKernel::eval_gpu`` (mlx/backend/cuda/custom_kernel.cpp) launches
with ``add_kernel_node_raw(kernel, grid, block, {}, shared_memory, args)``: the
cluster dimension it passes is empty, and the Python API has no argument for
one (its ``CommandEncoder`` does support cluster dims, for MLX's own kernels). The
route left is the compile-time ``__cluster_dims__`` attribute in the kernel's
source, which the driver applies to every launch of that function. This probe
kernel (each block reads its cluster neighbour's shared memory after a cluster
barrier) checks that route: NVRTC compiles it inside MLX's exact translation
unit (CPU, with the NVRTC of the compile tests), and on a CUDA device MLX runs
it with the clusters in place (a block's output is its neighbour's input).
"""

import pytest

import mlx.core as mx

import persistent_emulator as emu
from mlx_fastrnn.kernels.cuda_source import KernelSpec, generate_source, launch

CLUSTER = 4
THREADS = 128
BLOCKS = 8

# the launch bounds' trick (persistent.LAUNCH_BOUNDS): MLX writes "__global__ void ..."
HEADER = f"""
#undef __global__
#define __global__ __location__(global) __launch_bounds__({THREADS}, 1) __cluster_dims__({CLUSTER}, 1, 1)
"""
BODY = """
  extern __shared__ float smem[];
  cg::cluster_group cluster = cg::this_cluster();
  unsigned rank = cluster.block_rank();
  smem[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  cluster.sync();
  const float* peer = cluster.map_shared_rank(smem, (rank + 1) % cluster.num_blocks());
  out[blockIdx.x * blockDim.x + threadIdx.x] = peer[threadIdx.x];
  cluster.sync();  // the peer's shared memory stays until every block has read it
"""
SPEC = KernelSpec("frnn_cluster_probe", ("x",), ("out",), HEADER, BODY, (), 4 * THREADS,
                  (BLOCKS * THREADS, 1, 1), (THREADS, 1, 1))


def expected(x):
    """Block b's output: block (b's cluster start + (rank + 1) % CLUSTER)'s input."""
    blocks = x.reshape(BLOCKS // CLUSTER, CLUSTER, THREADS)
    return mx.concatenate([blocks[:, 1:], blocks[:, :1]], axis=1).reshape(-1)


@pytest.mark.skipif(emu.nvrtc_paths() is None, reason="MLX_FASTRNN_NVRTC / MLX_FASTRNN_JIT_HEADERS not set")
def test_cluster_kernel_compiles_in_mlx_translation_unit():
    _, src = generate_source(SPEC, [mx.float32], [1], [mx.float32])
    ok, log = emu.nvrtc_compile(src)
    assert ok, log[-3000:]
    regs, spill_st, spill_ld, stack = emu.ptxas_info(log)
    assert regs is not None and spill_st == spill_ld == stack == 0, log


@pytest.mark.gpu
def test_cluster_kernel_runs_through_mlx():
    if not mx.cuda.is_available():
        pytest.skip("needs CUDA")
    x = mx.arange(BLOCKS * THREADS, dtype=mx.float32)
    (out,) = launch(SPEC, [x], [x.shape], [mx.float32])  # as the whole-sequence kernels launch
    assert mx.array_equal(out, expected(x)).item()
