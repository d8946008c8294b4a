// The Python functions' entry to the ops (convt_ext/_ops.py, call()): one
// dispatcher call per function call. torch.ops reaches the same op by
// converting each Python argument through its schema and finding the
// overload on every call, some 4 us a call more (benchmarks/NOTES.md, item
// 30), on calls whose own host work is a few microseconds. The call goes
// through every dispatch key (autocast, the C++ Autograd kernel, tracing,
// dispatch modes), as a torch.ops call does; Python takes torch.ops where
// Python-level overrides apply (__torch_function__, torch.compile's
// tracing), which this skips. The arguments are boxed as torch.ops boxes
// them (int lists, any int64), since the Autograd kernel is boxed anyway.
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "op_handles.h"

namespace convt_ext {

namespace {

namespace py = pybind11;
using Ints = std::vector<int64_t>;

// The handle of an op of d spatial dimensions (1 to 3).
template <typename H>
const H& of_dims(const std::vector<H>& handles, size_t d) {
  TORCH_CHECK_VALUE(d >= 1 && d <= handles.size(), "convt_ext: 1, 2 or 3 spatial dimensions are supported, but got ", d);
  return handles[d - 1];
}

template <typename... Args>
at::Tensor call(const c10::OperatorHandle& op, Args&&... args) {
  torch::jit::Stack stack;
  stack.reserve(sizeof...(Args));
  (stack.emplace_back(std::forward<Args>(args)), ...);
  op.callBoxed(stack);
  return std::move(stack[0]).toTensor();
}

}  // namespace

void bind_calls(py::module& m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("_call_im2col", [](const at::Tensor& input, Ints kernel_size, Ints dilation, Ints padding, Ints stride) {
    return call(op_handles().im2col, input, std::move(kernel_size), std::move(dilation), std::move(padding),
                std::move(stride));
  }, no_gil);
  m.def("_call_col2im", [](const at::Tensor& input, Ints output_size, Ints kernel_size, Ints dilation,
                           Ints padding, Ints stride) {
    return call(op_handles().col2im, input, std::move(output_size), std::move(kernel_size), std::move(dilation),
                std::move(padding), std::move(stride));
  }, no_gil);
  m.def("_call_conv", [](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         Ints stride, Ints padding, Ints dilation, int64_t groups) {
    const auto& op = of_dims(op_handles().conv, stride.size());
    return call(op, input, weight, bias, std::move(stride), std::move(padding), std::move(dilation), groups);
  }, no_gil);
  m.def("_call_conv_transpose", [](const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, Ints stride, Ints padding,
                                   Ints output_padding, int64_t groups, Ints dilation) {
    const auto& op = of_dims(op_handles().conv_transpose, stride.size());
    return call(op, input, weight, bias, std::move(stride), std::move(padding), std::move(output_padding), groups,
                std::move(dilation));
  }, no_gil);
  m.def("_call_conv_weight", [](const at::Tensor& input, const at::Tensor& grad_output, Ints weight_size,
                                Ints stride, Ints padding, Ints dilation, int64_t groups) {
    const auto& op = of_dims(op_handles().conv_weight, stride.size());
    return call(op, input, grad_output, std::move(weight_size), std::move(stride), std::move(padding),
                std::move(dilation), groups);
  }, no_gil);
}

}  // namespace convt_ext
