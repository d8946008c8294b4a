// Test-only, never part of the installed library: the convolutions run with
// a GPU's plan on CPU tensors, so that CI, which has no GPU, executes the
// GPU's blocks, wide batches, buffer sizes and GEMM calls (Note [Device
// policy] in csrc/plan.h). The ops below call the library's own convolution
// code (csrc/ops.h, linked from the built convt_ext._C) with the policy
// device_policy() gives a CUDA tensor; the library itself always passes its
// tensors' own policy, so it has no such switch. tests/emulated_ops.py builds
// this file into the emulation extension: torch.ops.convt_ext_emulated.
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "ops.h"
#include "plan.h"

namespace convt_ext {
namespace {

DevicePolicy gpu() { return device_policy(c10::DeviceType::CUDA); }

// The spatial dimensions, from a geometry list's length.
int dims_of(at::IntArrayRef stride) {
  TORCH_CHECK_VALUE(stride.size() >= 1 && stride.size() <= 3,
                    "gpu plan: 1 to 3 spatial dimensions, but got stride of length ", stride.size());
  return static_cast<int>(stride.size());
}

void check_cpu(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cpu(), "gpu plan: runs on CPU tensors only");
}

at::Tensor conv_gpu_plan(const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_cpu(input);
  const int d = dims_of(stride);
  return conv("conv_gpu_plan", d, input, weight, bias, stride, padding, dilation, groups, gpu());
}

at::Tensor conv_transpose_gpu_plan(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef output_padding,
                                   int64_t groups, at::IntArrayRef dilation) {
  check_cpu(input);
  const int d = dims_of(stride);
  return conv_transpose("conv_transpose_gpu_plan", d, input, weight, bias, stride, padding,
                        output_padding, groups, dilation, gpu());
}

at::Tensor conv_weight_gpu_plan(const at::Tensor& input, const at::Tensor& grad_output,
                                at::IntArrayRef weight_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  check_cpu(input);
  const int d = dims_of(stride);
  return conv_weight("conv_weight_gpu_plan", d, input, grad_output, weight_size, stride, padding,
                     dilation, groups, gpu());
}

std::tuple<at::Tensor, at::Tensor> conv_transpose_backward_gpu_plan(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
    int64_t groups, at::IntArrayRef dilation) {
  check_cpu(input);
  const int d = dims_of(stride);
  return conv_transpose_backward("conv_transpose_backward_gpu_plan", d, grad_output, input, weight, stride,
                                 padding, output_padding, groups, dilation, gpu());
}

// The GPU policy's values, for the tests to check that they run a GPU's:
// [tasks, parallel, chunk_bytes, tile_bytes, wide_below, wide_pointwise, keep_scratch].
std::vector<int64_t> gpu_policy() {
  const DevicePolicy p = gpu();
  return {p.tasks, p.parallel, p.chunk_bytes, p.tile_bytes, p.wide_below, p.wide_pointwise, p.keep_scratch};
}

}  // namespace
}  // namespace convt_ext

TORCH_LIBRARY_FRAGMENT(convt_ext_emulated, m) {
  m.def("conv_gpu_plan(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
        "int[] dilation, int groups) -> Tensor");
  m.def("conv_transpose_gpu_plan(Tensor input, Tensor weight, Tensor? bias, int[] stride, "
        "int[] padding, int[] output_padding, int groups, int[] dilation) -> Tensor");
  m.def("conv_weight_gpu_plan(Tensor input, Tensor grad_output, int[] weight_size, int[] stride, "
        "int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("conv_transpose_backward_gpu_plan(Tensor grad_output, Tensor input, Tensor weight, "
        "int[] stride, int[] padding, int[] output_padding, int groups, int[] dilation) "
        "-> (Tensor, Tensor)");
  m.def("gpu_policy() -> int[]", &convt_ext::gpu_policy);
}

TORCH_LIBRARY_IMPL(convt_ext_emulated, CPU, m) {
  m.impl("conv_gpu_plan", &convt_ext::conv_gpu_plan);
  m.impl("conv_transpose_gpu_plan", &convt_ext::conv_transpose_gpu_plan);
  m.impl("conv_weight_gpu_plan", &convt_ext::conv_weight_gpu_plan);
  m.impl("conv_transpose_backward_gpu_plan", &convt_ext::conv_transpose_backward_gpu_plan);
}
