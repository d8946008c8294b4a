// Test-only: the CUDA kernels' per-element functions (elements.h) run over
// their whole grid on the CPU, with a chosen index type, so that CI, which
// has no GPU, tests the device logic itself. Exposed as the private ops
// torch.ops.convt_ext._emulated_im2col / _emulated_col2im (not public API):
// the same checks and allocation as im2col/col2im, with these kernels.
#include <ATen/Parallel.h>

#include <cstdint>

#include "checks.h"
#include "elements.h"
#include "kernels.h"
#include "ops.h"

namespace convt_ext {
namespace {

// The grid: one element per index in [0, total), as the grid-stride loops do.
template <typename index_t, typename F>
void emulate_grid(int64_t total, const F& element) {
  at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) element(static_cast<index_t>(i));
  });
}

template <typename index_t>
void check_index_type(const Window3& w, const at::Tensor& cols, const at::Tensor& image,
                      const at::Tensor& bias) {
  TORCH_CHECK_VALUE(fits_index<index_t>(w, extent(cols), extent(image)) &&
                        extent(bias) < std::numeric_limits<index_t>::max(),
                    "emulation: this geometry does not fit ", sizeof(index_t) * 8,
                    "-bit indexing (the CUDA path would take 64-bit indexing)");
}

template <typename index_t>
void im2col_emulated(const at::Tensor& image, const at::Tensor& cols, const Window3& w) {
  check_index_type<index_t>(w, cols, image, at::Tensor());
  dispatch_copy(image.scalar_type(), "im2col_emulated", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* x = data_as<scalar_t>(image);
    scalar_t* c = mutable_data_as<scalar_t>(cols);
    const auto xs = image_strides<index_t>(image);
    const auto cs = column_strides<index_t>(cols);
    emulate_grid<index_t>(w.batch * w.channels * w.window_numel(), [&](index_t i) {
      im2col_element<scalar_t, index_t>(x, c, w, xs, cs, i);
    });
  });
}

template <typename index_t>
void col2im_emulated(const at::Tensor& cols, const at::Tensor& bias, const at::Tensor& image,
                     const Window3& w) {
  check_index_type<index_t>(w, cols, image, bias);
  dispatch_sum(cols.scalar_type(), "col2im_emulated", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* c = data_as<scalar_t>(cols);
    const scalar_t* b = bias.defined() ? data_as<scalar_t>(bias) : nullptr;
    const index_t bs = bias.defined() ? static_cast<index_t>(bias.stride(0)) : 0;
    scalar_t* x = mutable_data_as<scalar_t>(image);
    const auto xs = image_strides<index_t>(image);
    const auto cs = column_strides<index_t>(cols);
    emulate_grid<index_t>(w.batch * w.channels * w.image_numel(), [&](index_t i) {
      col2im_element<scalar_t, sum_t<scalar_t>, index_t>(c, b, bs, x, w, cs, xs, i);
    });
  });
}

const WindowKernels kEmulated32{&im2col_emulated<int32_t>, &col2im_emulated<int32_t>};
const WindowKernels kEmulated64{&im2col_emulated<int64_t>, &col2im_emulated<int64_t>};

const WindowKernels* emulated(const at::Tensor& t, bool int32) {
  TORCH_CHECK_VALUE(t.is_cpu(), "emulation: runs on CPU tensors only");
  return int32 ? &kEmulated32 : &kEmulated64;
}

}  // namespace

at::Tensor emulated_im2col(const at::Tensor& input, at::IntArrayRef kernel_size,
                           at::IntArrayRef dilation, at::IntArrayRef padding,
                           at::IntArrayRef stride, bool int32) {
  return im2col_with(emulated(input, int32), input, kernel_size, dilation, padding, stride);
}

at::Tensor emulated_col2im(const at::Tensor& input, at::IntArrayRef output_size,
                           at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                           at::IntArrayRef padding, at::IntArrayRef stride, bool int32) {
  return col2im_with(emulated(input, int32), input, output_size, kernel_size, dilation, padding,
                     stride);
}

}  // namespace convt_ext
