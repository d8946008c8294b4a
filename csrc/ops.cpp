// Dispatcher schemas and registrations, and the small pybind11 module.
//
// The ops are registered for the CPU and CUDA dispatch keys in every build:
// their code is the same on every device (checks, allocation, ATen GEMMs), and
// only the two window kernels differ, found at run time in the WindowKernels
// table. A build without the CUDA path therefore answers a CUDA tensor with a
// clear "rebuild with CUDA" error instead of the dispatcher's generic one.
// Fake (meta) kernels and autograd are registered from Python (convt_ext/_ops.py).
#include <torch/library.h>

#include <pybind11/pybind11.h>

#include "kernels.h"
#include "ops.h"

TORCH_LIBRARY(convt_ext, m) {
  m.def("im2col(Tensor input, SymInt[2] kernel_size, SymInt[2] dilation, SymInt[2] padding, "
        "SymInt[2] stride) -> Tensor");
  m.def("col2im(Tensor input, SymInt[2] output_size, SymInt[2] kernel_size, SymInt[2] dilation, "
        "SymInt[2] padding, SymInt[2] stride) -> Tensor");
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, SymInt[2] stride, SymInt[2] padding, "
        "SymInt[2] dilation, SymInt groups) -> Tensor");
  m.def("conv_transpose2d(Tensor input, Tensor weight, Tensor? bias, SymInt[2] stride, "
        "SymInt[2] padding, SymInt[2] output_padding, SymInt groups, SymInt[2] dilation) -> Tensor");
  m.def("conv2d_weight(Tensor input, Tensor grad_output, SymInt[4] weight_size, SymInt[2] stride, "
        "SymInt[2] padding, SymInt[2] dilation, SymInt groups) -> Tensor");
  // No tensor inputs, so no dispatch key: one kernel serves every call.
  m.def("im2col_indices(int[2] input_size, int[2] kernel_size, int[2] dilation, int[2] padding, "
        "int[2] stride) -> Tensor",
        &convt_ext::im2col_indices);
}

#define CONVT_REGISTER_OPS(m)                          \
  m.impl("im2col", &convt_ext::im2col);                \
  m.impl("col2im", &convt_ext::col2im);                \
  m.impl("conv2d", &convt_ext::conv2d);                \
  m.impl("conv_transpose2d", &convt_ext::conv_transpose2d); \
  m.impl("conv2d_weight", &convt_ext::conv2d_weight)

TORCH_LIBRARY_IMPL(convt_ext, CPU, m) { CONVT_REGISTER_OPS(m); }
TORCH_LIBRARY_IMPL(convt_ext, CUDA, m) { CONVT_REGISTER_OPS(m); }

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "convt_ext native core: the ops live in torch.ops.convt_ext";
  // Whether the CUDA kernels were compiled into this build (see build_info()).
  m.def("cuda_compiled", [] { return convt_ext::has_window_kernels(c10::DeviceType::CUDA); });
  m.def("set_workspace_limit", &convt_ext::set_workspace_limit, py::arg("bytes"));
  m.def("workspace_limit", &convt_ext::workspace_limit);
}
