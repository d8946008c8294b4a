// CUDA im2col and col2im over the relation in ../im2col.h.
//
//   im2col: one thread per (n, c, oh, ow). It writes the kh*kw column entries
//           of its window; neighbouring threads write neighbouring positions,
//           so every store is coalesced.
//   col2im: a gather. One thread per image element (n, c, ih, iw) inverts the
//           relation with window_at() and sums its own taps in (ki, kj) order
//           in opmath (float for half types). No atomics: results are bitwise
//           deterministic, and match the CPU loops' order of summation.
//
// Index arithmetic is done in index_t: int32 when every offset fits, int64
// otherwise (see fits_32bit), so column buffers over 2^31 elements work.
//
// Only c10/cuda headers are used here (not ATen/cuda/CUDAContext.h, which
// needs cuBLAS headers); the GEMMs stay in conv.cpp, through ATen.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "../kernels.h"

namespace convt_ext {
namespace {

constexpr int kThreads = 256;

template <typename index_t>
struct Strides4 {
  index_t n, c, h, w;
};

template <typename index_t>
struct Strides3 {
  index_t n, r, l;
};

template <typename scalar_t, typename index_t>
__global__ void im2col_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ cols,
                              Window<2> w, Strides4<index_t> xs, Strides3<index_t> cs,
                              int64_t total) {
  const index_t C = w.channels, H = w.image[0], W = w.image[1];
  const index_t OH = w.windows[0], OW = w.windows[1];
  const index_t kh = w.kernel[0], kw = w.kernel[1];
  const index_t sh = w.stride[0], sw = w.stride[1], ph = w.padding[0], pw = w.padding[1];
  const index_t dh = w.dilation[0], dw = w.dilation[1];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const index_t idx = static_cast<index_t>(i);
    const index_t ow = idx % OW;
    const index_t oh = (idx / OW) % OH;
    const index_t c = (idx / (OW * OH)) % C;
    const index_t n = idx / (OW * OH * C);
    const scalar_t* src = x + n * xs.n + c * xs.c;
    scalar_t* dst = cols + n * cs.n + c * kh * kw * cs.r + (oh * OW + ow) * cs.l;
    for (index_t ki = 0; ki < kh; ++ki) {
      const index_t ih = tap<index_t>(oh, ki, sh, ph, dh);
      for (index_t kj = 0; kj < kw; ++kj) {
        const index_t iw = tap<index_t>(ow, kj, sw, pw, dw);
        const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
        dst[(ki * kw + kj) * cs.r] = inside ? src[ih * xs.h + iw * xs.w] : scalar_t(0);
      }
    }
  }
}

template <typename scalar_t, typename index_t>
__global__ void col2im_kernel(const scalar_t* __restrict__ cols, const scalar_t* __restrict__ bias,
                              index_t bias_stride, scalar_t* __restrict__ x, Window<2> w,
                              Strides3<index_t> cs, Strides4<index_t> xs, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t C = w.channels, H = w.image[0], W = w.image[1];
  const index_t OH = w.windows[0], OW = w.windows[1];
  const index_t kh = w.kernel[0], kw = w.kernel[1];
  const index_t sh = w.stride[0], sw = w.stride[1], ph = w.padding[0], pw = w.padding[1];
  const index_t dh = w.dilation[0], dw = w.dilation[1];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const index_t idx = static_cast<index_t>(i);
    const index_t iw = idx % W;
    const index_t ih = (idx / W) % H;
    const index_t c = (idx / (W * H)) % C;
    const index_t n = idx / (W * H * C);
    acc_t acc = bias ? static_cast<acc_t>(bias[c * bias_stride]) : acc_t(0);
    const scalar_t* src = cols + n * cs.n + c * kh * kw * cs.r;
    for (index_t ki = 0; ki < kh; ++ki) {
      const index_t oh = window_at<index_t>(ih, ki, sh, ph, dh, OH);
      if (oh < 0) continue;
      for (index_t kj = 0; kj < kw; ++kj) {
        const index_t ow = window_at<index_t>(iw, kj, sw, pw, dw, OW);
        if (ow < 0) continue;
        acc += static_cast<acc_t>(src[(ki * kw + kj) * cs.r + (oh * OW + ow) * cs.l]);
      }
    }
    x[n * xs.n + c * xs.c + ih * xs.h + iw * xs.w] = static_cast<scalar_t>(acc);
  }
}

// Largest element offset reachable in t, plus one.
int64_t extent(const at::Tensor& t) {
  int64_t e = 1;
  for (int64_t d = 0; d < t.dim(); ++d) e += (t.size(d) - 1) * std::abs(t.stride(d));
  return t.numel() == 0 ? 0 : e;
}

// int32 indexing is safe when every thread index and every offset, with the
// intermediate products the kernels form, stays below 2^31.
bool fits_32bit(const at::Tensor& cols, const at::Tensor& image) {
  constexpr int64_t limit = std::numeric_limits<int32_t>::max();
  return cols.numel() < limit && image.numel() < limit && extent(cols) < limit &&
         extent(image) < limit;
}

int blocks_for(int64_t total) {
  // A grid-stride loop covers the rest; 2^20 blocks saturate any current GPU.
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20));
}

template <typename index_t>
Strides4<index_t> strides4(const at::Tensor& t) {
  return {static_cast<index_t>(t.stride(0)), static_cast<index_t>(t.stride(1)),
          static_cast<index_t>(t.stride(2)), static_cast<index_t>(t.stride(3))};
}

template <typename index_t>
Strides3<index_t> strides3(const at::Tensor& t) {
  return {static_cast<index_t>(t.stride(0)), static_cast<index_t>(t.stride(1)),
          static_cast<index_t>(t.stride(2))};
}

void im2col_cuda(const at::Tensor& image, const at::Tensor& cols, const Window<2>& w) {
  const int64_t total = w.batch * w.channels * w.window_numel();
  if (total == 0) return;
  c10::cuda::CUDAGuard guard(image.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "im2col_cuda", [&] {
    if (fits_32bit(cols, image)) {
      im2col_kernel<scalar_t, int32_t><<<blocks_for(total), kThreads, 0, stream>>>(
          image.const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>(), w,
          strides4<int32_t>(image), strides3<int32_t>(cols), total);
    } else {
      im2col_kernel<scalar_t, int64_t><<<blocks_for(total), kThreads, 0, stream>>>(
          image.const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>(), w,
          strides4<int64_t>(image), strides3<int64_t>(cols), total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void col2im_cuda(const at::Tensor& cols, const at::Tensor& bias, const at::Tensor& image,
                 const Window<2>& w) {
  const int64_t total = w.batch * w.channels * w.image_numel();
  if (total == 0) return;
  c10::cuda::CUDAGuard guard(image.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cols.scalar_type(), "col2im_cuda", [&] {
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const int64_t bs = bias.defined() ? bias.stride(0) : 0;
    if (fits_32bit(cols, image)) {
      col2im_kernel<scalar_t, int32_t><<<blocks_for(total), kThreads, 0, stream>>>(
          cols.const_data_ptr<scalar_t>(), b, static_cast<int32_t>(bs),
          image.mutable_data_ptr<scalar_t>(), w, strides3<int32_t>(cols), strides4<int32_t>(image),
          total);
    } else {
      col2im_kernel<scalar_t, int64_t><<<blocks_for(total), kThreads, 0, stream>>>(
          cols.const_data_ptr<scalar_t>(), b, bs, image.mutable_data_ptr<scalar_t>(), w,
          strides3<int64_t>(cols), strides4<int64_t>(image), total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const bool registered = [] {
  register_window_kernels(c10::DeviceType::CUDA, WindowKernels{&im2col_cuda, &col2im_cuda});
  return true;
}();

}  // namespace
}  // namespace convt_ext
