// The Python functions' entry to the ops (convt_ext/_ops.py, call()): one
// typed dispatcher call per function call. torch.ops reaches the same op by
// boxing each Python argument and finding the overload on every call, some
// 4 us a call more (benchmarks/NOTES.md, item 30), on calls whose own host
// work is a few microseconds. The call goes through every dispatch key
// (autocast, the C++ Autograd kernel, tracing, dispatch modes), as a
// torch.ops call does; Python takes torch.ops where Python-level overrides
// apply (__torch_function__, torch.compile's tracing), which this skips.
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "op_handles.h"

namespace convt_ext {

namespace {

namespace py = pybind11;
using Ints = std::vector<int64_t>;

c10::SymIntArrayRef sym(const Ints& v) { return c10::fromIntArrayRefSlow(v); }

// The handle of an op of d spatial dimensions (1 to 3).
template <typename H>
const H& of_dims(const std::vector<H>& handles, size_t d) {
  TORCH_CHECK_VALUE(d >= 1 && d <= handles.size(), "convt_ext: 1, 2 or 3 spatial dimensions are supported, but got ", d);
  return handles[d - 1];
}

}  // namespace

void bind_calls(py::module& m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("_call_im2col", [](const at::Tensor& input, const Ints& kernel_size, const Ints& dilation,
                           const Ints& padding, const Ints& stride) {
    return op_handles().im2col.call(input, sym(kernel_size), sym(dilation), sym(padding), sym(stride));
  }, no_gil);
  m.def("_call_col2im", [](const at::Tensor& input, const Ints& output_size, const Ints& kernel_size,
                           const Ints& dilation, const Ints& padding, const Ints& stride) {
    return op_handles().col2im.call(input, sym(output_size), sym(kernel_size), sym(dilation), sym(padding),
                                    sym(stride));
  }, no_gil);
  m.def("_call_conv", [](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const Ints& stride, const Ints& padding, const Ints& dilation, int64_t groups) {
    return of_dims(op_handles().conv, stride.size())
        .call(input, weight, bias, sym(stride), sym(padding), sym(dilation), groups);
  }, no_gil);
  m.def("_call_conv_transpose", [](const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const Ints& stride, const Ints& padding,
                                   const Ints& output_padding, int64_t groups, const Ints& dilation) {
    return of_dims(op_handles().conv_transpose, stride.size())
        .call(input, weight, bias, sym(stride), sym(padding), sym(output_padding), groups, sym(dilation));
  }, no_gil);
  m.def("_call_conv_weight", [](const at::Tensor& input, const at::Tensor& grad_output, const Ints& weight_size,
                                const Ints& stride, const Ints& padding, const Ints& dilation, int64_t groups) {
    return of_dims(op_handles().conv_weight, stride.size())
        .call(input, grad_output, sym(weight_size), sym(stride), sym(padding), sym(dilation), groups);
  }, no_gil);
}

}  // namespace convt_ext
