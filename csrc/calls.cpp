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
//
// Note [The fast entry]
// convt_ext.functional's argument checks cost some 3 us of Python a call, as
// much as the op's own host work on a small tensor (benchmarks/NOTES.md,
// item 33). So the conv functions first offer their arguments, as the
// caller wrote them, to a _fast_* entry here. It takes the call only where
// the Python checks would pass it unchanged: plain tensors (or Parameters),
// a batched input, each geometry argument an int or a list or tuple of one
// int per spatial dimension, none a bool and all within int64, and groups
// an int. It refuses (returns None) under a torch.func transform or a
// __torch_function__ mode, which the Python side handles; everything else
// (strings, unbatched inputs, SymInts, subclasses, bad types) goes the
// Python way too, whose errors name the argument. torch.compile never sees
// it (the Python side asks first whether it is compiling).
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>
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

// An int (not a bool), or a list or tuple of d of them, as d int64s; false
// for anything else, a value past int64 included.
bool ints_of(PyObject* o, size_t d, Ints& out) {
  const auto one = [](PyObject* v, int64_t& into) {
    if (!PyLong_CheckExact(v)) return false;
    int overflow = 0;
    const long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    into = static_cast<int64_t>(x);
    return overflow == 0 && !(x == -1 && PyErr_Occurred());
  };
  out.assign(d, 0);
  if (PyLong_CheckExact(o)) {
    if (!one(o, out[0])) return false;
    std::fill(out.begin(), out.end(), out[0]);
    return true;
  }
  if (!(PyTuple_Check(o) || PyList_Check(o)) || static_cast<size_t>(PySequence_Fast_GET_SIZE(o)) != d) return false;
  PyObject** items = PySequence_Fast_ITEMS(o);
  for (size_t i = 0; i < d; ++i) {
    if (!one(items[i], out[i])) return false;
  }
  return true;
}

// Note [The fast entry]: whether the call may skip the Python checks at all.
bool fast_entry_open() {
  return !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !at::impl::torch_function_mode_enabled();
}

// A call's tensors and groups, where the fast entry takes them.
struct FastCall {
  const at::Tensor* input = nullptr;
  const at::Tensor* weight = nullptr;
  std::optional<at::Tensor> bias;
  int64_t groups = 1;
};
bool plain_tensor(PyObject* o) { return THPVariable_CheckExact(o); }
bool fast_call(size_t d, py::handle input, py::handle weight, py::handle bias, py::handle groups,
               FastCall& f) {
  Ints g;
  if (!fast_entry_open() || d < 1 || d > 3 || !plain_tensor(input.ptr()) || !plain_tensor(weight.ptr()) ||
      !(bias.is_none() || plain_tensor(bias.ptr())) || !PyLong_CheckExact(groups.ptr()) ||
      !ints_of(groups.ptr(), 1, g)) {
    return false;
  }
  f.input = &THPVariable_Unpack(input.ptr());
  f.weight = &THPVariable_Unpack(weight.ptr());
  if (!bias.is_none()) f.bias = THPVariable_Unpack(bias.ptr());
  f.groups = g[0];
  return static_cast<size_t>(f.input->dim()) == d + 2;
}

// The op's output, computed without the GIL.
template <typename Compute>
py::object fast(const Compute& compute) {
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = compute();
  }
  return py::cast(std::move(out));
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

  // Note [The fast entry]: conv and conv_transpose; None where it refuses.
  m.def("_fast_conv", [](size_t d, py::handle input, py::handle weight, py::handle bias, py::handle stride,
                         py::handle padding, py::handle dilation, py::handle groups) -> py::object {
    FastCall f;
    Ints s, p, dl;
    if (!fast_call(d, input, weight, bias, groups, f) || !ints_of(stride.ptr(), d, s) ||
        !ints_of(padding.ptr(), d, p) || !ints_of(dilation.ptr(), d, dl)) {
      return py::none();
    }
    return fast([&] { return call(op_handles().conv[d - 1], *f.input, *f.weight, f.bias, s, p, dl, f.groups); });
  });
  m.def("_fast_conv_transpose", [](size_t d, py::handle input, py::handle weight, py::handle bias,
                                   py::handle stride, py::handle padding, py::handle output_padding,
                                   py::handle groups, py::handle dilation) -> py::object {
    FastCall f;
    Ints s, p, op, dl;
    if (!fast_call(d, input, weight, bias, groups, f) || !ints_of(stride.ptr(), d, s) ||
        !ints_of(padding.ptr(), d, p) || !ints_of(output_padding.ptr(), d, op) || !ints_of(dilation.ptr(), d, dl)) {
      return py::none();
    }
    return fast([&] {
      return call(op_handles().conv_transpose[d - 1], *f.input, *f.weight, f.bias, s, p, op, f.groups, dl);
    });
  });
}

}  // namespace convt_ext
