// CUDA im2col and col2im: grid-stride loops around the per-element functions
// of ../elements.h (which tests/emulated/emulate.cpp also runs on the CPU, in CI).
//
// Index arithmetic is done in index_t: int32 when fits_index() proves that
// every index, offset and coordinate fits, int64 otherwise.
//
// Only c10/cuda headers are used here (not ATen/cuda/CUDAContext.h, which
// needs cuBLAS headers); the GEMMs go through the engine layer (../gemm.h).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../grid.h"

namespace convt_ext {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename index_t>
__global__ void im2col_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ cols,
                              Window3 w, ImageStrides<index_t> xs, ColumnStrides<index_t> cs,
                              int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    im2col_element<scalar_t, index_t>(x, cols, w, xs, cs, static_cast<index_t>(i));
  }
}

template <typename scalar_t, typename index_t>
__global__ void col2im_kernel(const scalar_t* __restrict__ cols, const scalar_t* __restrict__ bias,
                              index_t bias_stride, scalar_t* __restrict__ x, Window3 w,
                              ColumnStrides<index_t> cs, ImageStrides<index_t> xs, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    col2im_element<scalar_t, sum_t<scalar_t>, index_t>(cols, bias, bias_stride, x, w, cs,
                                                                 xs, static_cast<index_t>(i));
  }
}

int blocks_for(int64_t total) {
  // A grid-stride loop covers the rest; 2^20 blocks saturate any current GPU.
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20));
}

// The private ops' CUDA kernels (../kernels.h).
void im2col_cuda(const at::Tensor& image, const at::Tensor& cols, at::IntArrayRef window) {
  const Window3 w = unpack_window(window);
  const int64_t total = w.batch * w.channels * w.window_numel();
  if (total == 0) return;
  c10::cuda::CUDAGuard guard(image.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool int32_indexing = fits_index<int32_t>(w, extent(cols), extent(image));
  dispatch_copy(image.scalar_type(), "im2col_cuda", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    if (int32_indexing) {
      im2col_kernel<scalar_t, int32_t><<<blocks_for(total), kThreads, 0, stream>>>(
          data_as<scalar_t>(image), mutable_data_as<scalar_t>(cols), w,
          image_strides<int32_t>(image), column_strides<int32_t>(cols), total);
    } else {
      im2col_kernel<scalar_t, int64_t><<<blocks_for(total), kThreads, 0, stream>>>(
          data_as<scalar_t>(image), mutable_data_as<scalar_t>(cols), w,
          image_strides<int64_t>(image), column_strides<int64_t>(cols), total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void col2im_cuda(const at::Tensor& cols, const std::optional<at::Tensor>& bias_arg,
                 const at::Tensor& image, at::IntArrayRef window) {
  const Window3 w = unpack_window(window);
  const at::Tensor bias = bias_arg.value_or(at::Tensor());
  const int64_t total = w.batch * w.channels * w.image_numel();
  if (total == 0) return;
  c10::cuda::CUDAGuard guard(image.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool int32_indexing = fits_index<int32_t>(w, extent(cols), extent(image)) &&
                     extent(bias) < std::numeric_limits<int32_t>::max();
  dispatch_sum(cols.scalar_type(), "col2im_cuda", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* b = bias.defined() ? data_as<scalar_t>(bias) : nullptr;
    const int64_t bs = bias.defined() ? bias.stride(0) : 0;
    if (int32_indexing) {
      col2im_kernel<scalar_t, int32_t><<<blocks_for(total), kThreads, 0, stream>>>(
          data_as<scalar_t>(cols), b, static_cast<int32_t>(bs), mutable_data_as<scalar_t>(image),
          w, column_strides<int32_t>(cols), image_strides<int32_t>(image), total);
    } else {
      col2im_kernel<scalar_t, int64_t><<<blocks_for(total), kThreads, 0, stream>>>(
          data_as<scalar_t>(cols), b, bs, mutable_data_as<scalar_t>(image), w,
          column_strides<int64_t>(cols), image_strides<int64_t>(image), total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace convt_ext

TORCH_LIBRARY_IMPL(convt_ext, CUDA, m) {
  m.impl("_im2col_into", &convt_ext::im2col_cuda);
  m.impl("_col2im_into", &convt_ext::col2im_cuda);
}
