// Dispatcher schemas and registrations (the small pybind11 module is in
// bindings.cpp).
//
// The public ops' code is the same on every device (checks, allocation, the
// GEMM engine), registered for the CPU key, and for the CUDA key in CUDA
// builds; only the two window kernels differ, registered per key by each
// device's file as the private ops _im2col_into / _col2im_into (kernels.h).
// A build without the CUDA path registers, for the CUDA key, a kernel that
// says how to rebuild, instead of the dispatcher's generic error.
// im2col/col2im take geometry lists of any length 1-3; each convolution has
// an op per dimension (conv1d, conv2d, conv3d, ...) with torch's schema, all
// served by one generic function (ops.h). Fake (meta) kernels and autograd
// are registered from Python (convt_ext/_ops.py).
//
// Note [Autocast]
// The convolutions follow torch's autocast rule for its own (the
// "lower_precision_fp" list): under torch.autocast every floating input but
// float64 is cast to the autocast dtype, and the op runs in it. The kernels
// sit at the AutocastCPU and AutocastCUDA keys, in C++ like ATen's, so eager
// mode, autograd (the casts are differentiable) and torch.compile's tracing
// all meet the same rule. im2col, col2im and the weight gradients are not
// registered there: they keep their inputs' dtype, as F.unfold, F.fold and
// torch.nn.grad do.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops.h"
#include "plan.h"

namespace convt_ext {

namespace {

constexpr const char* kConv[] = {"", "conv1d", "conv2d", "conv3d"};
constexpr const char* kConvTranspose[] = {"", "conv_transpose1d", "conv_transpose2d",
                                          "conv_transpose3d"};
constexpr const char* kConvWeight[] = {"", "conv1d_weight", "conv2d_weight", "conv3d_weight"};

template <int D>
at::Tensor conv_nd(const at::Tensor& input, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv(kConv[D], D, input, weight, bias, stride, padding, dilation, groups,
              device_policy(input));
}

template <int D>
at::Tensor conv_transpose_nd(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef output_padding,
                             int64_t groups, at::IntArrayRef dilation) {
  return conv_transpose(kConvTranspose[D], D, input, weight, bias, stride, padding, output_padding,
                        groups, dilation, device_policy(input));
}

template <int D>
at::Tensor conv_weight_nd(const at::Tensor& input, const at::Tensor& grad_output,
                          at::IntArrayRef weight_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv_weight(kConvWeight[D], D, input, grad_output, weight_size, stride, padding,
                     dilation, groups, device_policy(input));
}

// Both gradients of conv_transposeNd at once; D from the weight.
std::tuple<at::Tensor, at::Tensor> conv_transpose_backward_any(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
    int64_t groups, at::IntArrayRef dilation) {
  const int64_t d = weight.dim() - 2;
  TORCH_CHECK_VALUE(d >= 1 && d <= 3, "_conv_transpose_backward: weight must be 3-d to 5-d, but got shape ",
                    weight.sizes());
  return conv_transpose_backward(kConvTranspose[d], static_cast<int>(d), grad_output, input,
                                 weight, stride, padding, output_padding, groups, dilation,
                                 device_policy(input));
}

template <int D>
void define_convolutions(torch::Library& m) {
  const std::string n = "SymInt[" + std::to_string(D) + "]";
  const std::string schemas[] = {
      std::string(kConv[D]) + "(Tensor input, Tensor weight, Tensor? bias, " + n + " stride, " +
          n + " padding, " + n + " dilation, SymInt groups) -> Tensor",
      std::string(kConvTranspose[D]) + "(Tensor input, Tensor weight, Tensor? bias, " + n +
          " stride, " + n + " padding, " + n + " output_padding, SymInt groups, " + n +
          " dilation) -> Tensor",
      std::string(kConvWeight[D]) + "(Tensor input, Tensor grad_output, SymInt[" +
          std::to_string(D + 2) + "] weight_size, " + n + " stride, " + n + " padding, " + n +
          " dilation, SymInt groups) -> Tensor"};
  for (const std::string& schema : schemas) m.def(schema.c_str());
}

template <int D>
void impl_convolutions(torch::Library& m) {
  m.impl(kConv[D], &conv_nd<D>);
  m.impl(kConvTranspose[D], &conv_transpose_nd<D>);
  m.impl(kConvWeight[D], &conv_weight_nd<D>);
}

using SymInts = c10::SymIntArrayRef;
using ConvSignature = at::Tensor(const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, SymInts, SymInts, SymInts,
                                 c10::SymInt);
using ConvTransposeSignature = at::Tensor(const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&, SymInts, SymInts,
                                          SymInts, c10::SymInt, SymInts);

// The casts of Note [Autocast], with the autocast key excluded for the call.
template <c10::DeviceType Device>
struct AutocastCast {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{
      at::autocast::get_autocast_dispatch_key_from_device_type(Device)};
  at::ScalarType dtype = at::autocast::get_autocast_dtype(Device);
  template <typename T>
  T operator()(const T& t) const {
    return at::autocast::cached_cast(dtype, t, Device);
  }
};

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string("convt_ext::") + name).c_str(), "")
      .typed<Signature>();
}

template <c10::DeviceType Device, int D>
at::Tensor conv_autocast(const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, SymInts stride, SymInts padding,
                         SymInts dilation, c10::SymInt groups) {
  static const auto op = op_handle<ConvSignature>(kConv[D]);
  const AutocastCast<Device> cast;
  return op.call(cast(input), cast(weight), cast(bias), stride, padding, dilation, groups);
}

template <c10::DeviceType Device, int D>
at::Tensor conv_transpose_autocast(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, SymInts stride,
                                   SymInts padding, SymInts output_padding, c10::SymInt groups,
                                   SymInts dilation) {
  static const auto op = op_handle<ConvTransposeSignature>(kConvTranspose[D]);
  const AutocastCast<Device> cast;
  return op.call(cast(input), cast(weight), cast(bias), stride, padding, output_padding, groups,
                 dilation);
}

template <c10::DeviceType Device>
void impl_autocast(torch::Library& m) {
  m.impl(kConv[1], &conv_autocast<Device, 1>);
  m.impl(kConv[2], &conv_autocast<Device, 2>);
  m.impl(kConv[3], &conv_autocast<Device, 3>);
  m.impl(kConvTranspose[1], &conv_transpose_autocast<Device, 1>);
  m.impl(kConvTranspose[2], &conv_transpose_autocast<Device, 2>);
  m.impl(kConvTranspose[3], &conv_transpose_autocast<Device, 3>);
}

#ifndef CONVT_EXT_CUDA
// A CUDA tensor in a build without the CUDA path.
void needs_cuda_build(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(), ": convt_ext was built without support for CUDA tensors. "
              "Rebuild it with the CUDA toolkit: CUDA_HOME=/path/to/cuda FORCE_CUDA=1 "
              "pip install --no-build-isolation --force-reinstall . (see the README)");
}
#endif

void impl_all(torch::Library& m) {
  m.impl("im2col", &im2col);
  m.impl("col2im", &col2im);
  m.impl("im2col.out", &im2col_out);
  m.impl("col2im.out", &col2im_out);
  impl_convolutions<1>(m);
  impl_convolutions<2>(m);
  impl_convolutions<3>(m);
  m.impl("_conv_transpose_backward", &conv_transpose_backward_any);
}

// The public ops' names, for registrations that cover them all.
std::vector<std::string> public_ops() {
  std::vector<std::string> names{"im2col", "col2im", "im2col.out", "col2im.out",
                                 "_conv_transpose_backward"};
  for (int d = 1; d <= 3; ++d) {
    names.insert(names.end(), {kConv[d], kConvTranspose[d], kConvWeight[d]});
  }
  return names;
}

}  // namespace
}  // namespace convt_ext

TORCH_LIBRARY(convt_ext, m) {
  m.def("im2col(Tensor input, SymInt[] kernel_size, SymInt[] dilation, SymInt[] padding, "
        "SymInt[] stride) -> Tensor");
  m.def("col2im(Tensor input, SymInt[] output_size, SymInt[] kernel_size, SymInt[] dilation, "
        "SymInt[] padding, SymInt[] stride) -> Tensor");
  // out= variants return nothing (the Python functions return out), so
  // torch.compile can functionalize them.
  m.def("im2col.out(Tensor input, SymInt[] kernel_size, SymInt[] dilation, SymInt[] padding, "
        "SymInt[] stride, *, Tensor(a!) out) -> ()");
  m.def("col2im.out(Tensor input, SymInt[] output_size, SymInt[] kernel_size, "
        "SymInt[] dilation, SymInt[] padding, SymInt[] stride, *, Tensor(a!) out) -> ()");
  convt_ext::define_convolutions<1>(m);
  convt_ext::define_convolutions<2>(m);
  convt_ext::define_convolutions<3>(m);
  // Both gradients of conv_transpose{1,2,3}d from one set of columns (Note
  // [One column buffer for conv_transpose's backward]); no derivative of its own.
  m.def("_conv_transpose_backward(Tensor grad_output, Tensor input, Tensor weight, "
        "SymInt[] stride, SymInt[] padding, SymInt[] output_padding, SymInt groups, "
        "SymInt[] dilation) -> (Tensor, Tensor)");
  // No tensor inputs, so no dispatch key: one kernel serves every call.
  m.def("im2col_indices(int[] input_size, int[] kernel_size, int[] dilation, int[] padding, "
        "int[] stride) -> Tensor",
        &convt_ext::im2col_indices);
  // The device kernels (kernels.h): one per dispatch key, private.
  m.def("_im2col_into(Tensor image, Tensor(a!) cols, int[] window) -> ()");
  m.def("_col2im_into(Tensor cols, Tensor? bias, Tensor(b!) image, int[] window) -> ()");
  // The depthwise path's kernels (conv/depthwise.h): conv (transposed = false)
  // or conv_transpose into `out`, and the weight gradient.
  m.def("_depthwise_into(Tensor input, Tensor weight, Tensor? bias, Tensor(a!) out, int[] window, "
        "int groups, bool transposed) -> ()");
  m.def("_depthwise_weight_into(Tensor image, Tensor windows, Tensor(a!) grad_weight, int[] window, "
        "int groups) -> ()");
}

TORCH_LIBRARY_IMPL(convt_ext, CPU, m) { convt_ext::impl_all(m); }
TORCH_LIBRARY_IMPL(convt_ext, CUDA, m) {
#ifdef CONVT_EXT_CUDA
  convt_ext::impl_all(m);
#else
  for (const std::string& name : convt_ext::public_ops()) {
    m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&convt_ext::needs_cuda_build>());
  }
#endif
}
TORCH_LIBRARY_IMPL(convt_ext, AutocastCPU, m) { convt_ext::impl_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(convt_ext, AutocastCUDA, m) { convt_ext::impl_autocast<c10::DeviceType::CUDA>(m); }
