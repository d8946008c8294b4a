// Test-only, never part of the installed library: the CUDA kernels'
// per-element functions (csrc/elements.h) run over their whole grid on the
// CPU, with a chosen index type, so that CI, which has no GPU, tests the
// device logic itself. The tests build it as an extension of its own
// (tests/emulated_ops.py), with the ops torch.ops.convt_ext_emulated.im2col
// and .col2im: the library's own op makes the checks, the allocation and the
// result's shape; then a sentinel fills the result and the emulated grid
// overwrites every element, so an element the grid misses shows.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "checks.h"
#include "grid.h"

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

using Geometry = c10::SymIntArrayRef;

c10::SymIntArrayRef sym(at::IntArrayRef v) { return c10::fromIntArrayRefSlow(v); }

// (N, C, *spatial) lifted to three spatial dimensions (Note [N-d by lifting]).
at::Tensor lift(at::Tensor t) {
  while (t.dim() < 2 + kMaxDims) t = t.unsqueeze(2);
  return t;
}

// Every byte of a fresh result set to a pattern the kernels never write alone.
void fill_sentinel(const at::Tensor& t) { std::memset(t.data_ptr(), 0x5A, t.nbytes()); }

at::Tensor emulated_im2col(const at::Tensor& input, at::IntArrayRef kernel_size,
                           at::IntArrayRef dilation, at::IntArrayRef padding,
                           at::IntArrayRef stride, bool int32) {
  TORCH_CHECK_VALUE(input.is_cpu(), "emulation: runs on CPU tensors only");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("convt_ext::im2col", "")
                             .typed<at::Tensor(const at::Tensor&, Geometry, Geometry, Geometry, Geometry)>();
  const at::Tensor result =
      op.call(input, sym(kernel_size), sym(dilation), sym(padding), sym(stride));
  const int dims = static_cast<int>(kernel_size.size());
  const at::Tensor x = input.dim() == dims + 2 ? input : input.unsqueeze(0);
  const at::Tensor cols = result.dim() == 3 ? result : result.unsqueeze(0);
  int64_t windows[kMaxDims];
  window_counts("im2col", "input", x.sizes().slice(2), kernel_size, stride, padding, dilation,
                windows);
  const Window3 w = make_window("im2col", x.size(0), x.size(1), x.sizes().slice(2), windows,
                                kernel_size, stride, padding, dilation);
  fill_sentinel(cols);
  (int32 ? &im2col_emulated<int32_t> : &im2col_emulated<int64_t>)(lift(x), cols, w);
  return result;
}

at::Tensor emulated_col2im(const at::Tensor& input, at::IntArrayRef output_size,
                           at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                           at::IntArrayRef padding, at::IntArrayRef stride, bool int32) {
  TORCH_CHECK_VALUE(input.is_cpu(), "emulation: runs on CPU tensors only");
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convt_ext::col2im", "")
          .typed<at::Tensor(const at::Tensor&, Geometry, Geometry, Geometry, Geometry, Geometry)>();
  const at::Tensor result = op.call(input, sym(output_size), sym(kernel_size), sym(dilation),
                                    sym(padding), sym(stride));
  const at::Tensor cols = input.dim() == 3 ? input : input.unsqueeze(0);
  const at::Tensor image = input.dim() == 3 ? result : result.unsqueeze(0);
  int64_t windows[kMaxDims];
  window_counts("col2im", "output_size", output_size, kernel_size, stride, padding, dilation,
                windows);
  const int64_t kernel_numel = c10::multiply_integers(kernel_size);
  const Window3 w = make_window("col2im", cols.size(0), cols.size(1) / kernel_numel, output_size,
                                windows, kernel_size, stride, padding, dilation);
  fill_sentinel(image);
  (int32 ? &col2im_emulated<int32_t> : &col2im_emulated<int64_t>)(cols, at::Tensor(), lift(image),
                                                                  w);
  return result;
}

// The depthwise kernels' grid (cuda/depthwise_cuda.cu) on the CPU: op 0
// conv, 1 conv_transpose, 2 the weight gradient, into a sentinel-filled
// `out` of the shape (and strides) the caller gives. Every tensor (N, C,
// *spatial) or the weight, lifted here; the window from the two images.
at::Tensor emulated_depthwise(const at::Tensor& image, const at::Tensor& windows, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& out,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, int64_t op, bool int32) {
  TORCH_CHECK_VALUE(out.is_cpu(), "emulation: runs on CPU tensors only");
  const Window3 w = make_window("depthwise", image.size(0), image.size(1), image.sizes().slice(2),
                                windows.sizes().slice(2).data(), kernel_size, stride, padding, dilation);
  const at::Tensor result = out.clone();
  fill_sentinel(result);
  const at::Tensor b = bias.value_or(at::Tensor());
  const at::Tensor x_image = op == 1 ? at::Tensor() : lift(image);
  const at::Tensor x_windows = op == 0 ? at::Tensor() : lift(windows);
  const at::Tensor wt = op == 2 ? at::Tensor() : lift(weight);
  const at::Tensor y = lift(result);
  const int64_t channels = op == 2 ? 0 : y.size(1);
  dispatch_sum(result.scalar_type(), "depthwise_emulated", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    if constexpr (std::is_floating_point_v<scalar_t> || std::is_same_v<scalar_t, at::Half> ||
                  std::is_same_v<scalar_t, at::BFloat16>) {
      const auto run = [&](auto index_tag) {
        using index_t = typename decltype(index_tag)::type;
        TORCH_CHECK_VALUE(depthwise_fits<index_t>(w, x_image, x_windows, wt, b, y), "emulation: this geometry does "
                          "not fit ", sizeof(index_t) * 8, "-bit indexing (the CUDA path would take 64-bit indexing)");
        const auto a = depthwise_args<scalar_t, index_t>(x_image, x_windows, wt, b, y, groups);
        emulate_grid<index_t>(y.numel(), [&](index_t i) {
          depthwise_element<scalar_t, sum_t<scalar_t>, index_t>(static_cast<int>(op), a, w,
                                                                static_cast<index_t>(channels), i);
        });
      };
      if (int32) {
        run(TypeTag<int32_t>{});
      } else {
        run(TypeTag<int64_t>{});
      }
    } else {
      TORCH_CHECK_TYPE(false, "depthwise_emulated: no kernel for dtype ", result.scalar_type());
    }
  });
  return result;
}

}  // namespace
}  // namespace convt_ext

TORCH_LIBRARY(convt_ext_emulated, m) {
  m.def("depthwise(Tensor image, Tensor windows, Tensor weight, Tensor? bias, Tensor out, int[] kernel_size, "
        "int[] stride, int[] padding, int[] dilation, int groups, int op, bool int32) -> Tensor");
  m.def("im2col(Tensor input, int[] kernel_size, int[] dilation, int[] padding, int[] stride, "
        "bool int32) -> Tensor");
  m.def("col2im(Tensor input, int[] output_size, int[] kernel_size, int[] dilation, "
        "int[] padding, int[] stride, bool int32) -> Tensor");
}

TORCH_LIBRARY_IMPL(convt_ext_emulated, CPU, m) {
  m.impl("im2col", &convt_ext::emulated_im2col);
  m.impl("col2im", &convt_ext::emulated_col2im);
  m.impl("depthwise", &convt_ext::emulated_depthwise);
}
