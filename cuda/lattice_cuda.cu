// CUDA backend: the same kernels (lattice_kernels.h) and driver (lattice_filter.h) as the CPU build, launched as
// CUDA grids on the current stream; registered as the CUDA kernel of `locbe::lattice_filter`.
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a bare nvcc install lacks
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lattice_filter.h"

namespace locbe {

template <class F>
__global__ void grid_kernel(int64_t n, F f) {
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) f(i);
}

struct CudaLaunch {
  static constexpr bool kCuda = true;
  template <class F>
  static void run(int64_t n, const F& f) {
    if (n == 0) return;
    constexpr int threads = 256;
    const int64_t blocks = (n + threads - 1) / threads;
    grid_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

torch::Tensor lattice_filter_cuda(const torch::Tensor& image, const torch::Tensor& values, double sigma_xy,
                                  double sigma_rgb, bool reverse, bool atomic_splat) {
  const c10::cuda::CUDAGuard guard(values.device());
  return lattice_filter_impl<CudaLaunch>(image, values, sigma_xy, sigma_rgb, reverse, atomic_splat);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> lattice_build_cuda(const torch::Tensor& features) {
  const c10::cuda::CUDAGuard guard(features.device());
  return lattice_build_impl<CudaLaunch>(features);
}

torch::Tensor lattice_apply_cuda(const torch::Tensor& weights, const torch::Tensor& entries,
                                 const torch::Tensor& neighbours, const torch::Tensor& offsets,
                                 const torch::Tensor& values, bool reverse) {
  const c10::cuda::CUDAGuard guard(values.device());
  return lattice_apply_impl<CudaLaunch>(weights, entries, neighbours, offsets, values, reverse);
}

void lattice_apply_out_cuda(const torch::Tensor& weights, const torch::Tensor& entries,
                            const torch::Tensor& neighbours, const torch::Tensor& offsets,
                            const torch::Tensor& values, bool reverse, torch::Tensor out) {
  const c10::cuda::CUDAGuard guard(values.device());
  lattice_apply_into<CudaLaunch>(weights, entries, neighbours, offsets, values, reverse, out);
}

}  // namespace locbe

TORCH_LIBRARY_IMPL(locbe, CUDA, m) {
  m.impl("lattice_filter", &locbe::lattice_filter_cuda);
  m.impl("lattice_build", &locbe::lattice_build_cuda);
  m.impl("lattice_apply", &locbe::lattice_apply_cuda);
  m.impl("lattice_apply_out", &locbe::lattice_apply_out_cuda);
}
