// The depthwise path's CUDA kernels: grid-stride loops around the element
// functions of ../depthwise_elements.h (which tests/emulated/emulate.cpp
// also runs on the CPU, in CI), one thread per output element. Index
// arithmetic in int32 where fits_index() proves that every index fits.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../depthwise_elements.h"
#include "../dtypes.h"
#include "../grid.h"

namespace convt_ext {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20));
}

template <typename scalar_t, typename index_t>
__global__ void depthwise_kernel(DepthwiseArgs<scalar_t, index_t> a, Window3 w, index_t channels, int op,
                                 int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    depthwise_element<scalar_t, sum_t<scalar_t>, index_t>(op, a, w, channels, static_cast<index_t>(i));
  }
}

// One launch over `out`'s elements.
void launch(const at::Tensor& image, const at::Tensor& windows, const at::Tensor& weight,
            const at::Tensor& bias, const at::Tensor& out, const Window3& w, int64_t groups, int op) {
  const int64_t total = out.numel();
  if (total == 0) return;
  c10::cuda::CUDAGuard guard(out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool int32_indexing = depthwise_fits<int32_t>(w, image, windows, weight, bias, out);
  const int64_t channels = op == 2 ? 0 : out.size(1);
  dispatch_sum(out.scalar_type(), "depthwise_cuda", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    if constexpr (std::is_floating_point<scalar_t>::value || std::is_same<scalar_t, at::Half>::value ||
                  std::is_same<scalar_t, at::BFloat16>::value) {
      if (int32_indexing) {
        depthwise_kernel<scalar_t, int32_t><<<blocks_for(total), kThreads, 0, stream>>>(
            depthwise_args<scalar_t, int32_t>(image, windows, weight, bias, out, groups), w,
            static_cast<int32_t>(channels), op, total);
      } else {
        depthwise_kernel<scalar_t, int64_t><<<blocks_for(total), kThreads, 0, stream>>>(
            depthwise_args<scalar_t, int64_t>(image, windows, weight, bias, out, groups), w, channels, op, total);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      TORCH_CHECK_TYPE(false, "depthwise_cuda: no kernel for dtype ", out.scalar_type());
    }
  });
}

void depthwise_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& out, at::IntArrayRef window, int64_t groups, bool transposed) {
  const at::Tensor b = bias.value_or(at::Tensor());
  if (transposed) {
    launch(at::Tensor(), input, weight, b, out, unpack_window(window), groups, 1);
  } else {
    launch(input, at::Tensor(), weight, b, out, unpack_window(window), groups, 0);
  }
}

void depthwise_weight_cuda(const at::Tensor& image, const at::Tensor& windows, const at::Tensor& grad_weight,
                           at::IntArrayRef window, int64_t groups) {
  launch(image, windows, at::Tensor(), at::Tensor(), grad_weight, unpack_window(window), groups, 2);
}

}  // namespace
}  // namespace convt_ext

TORCH_LIBRARY_IMPL(convt_ext, CUDA, m) {
  m.impl("_depthwise_into", &convt_ext::depthwise_cuda);
  m.impl("_depthwise_weight_into", &convt_ext::depthwise_weight_cuda);
}
