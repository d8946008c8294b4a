// The ops' Autograd kernels, in C++: the duality table of docs/design.md as
// code. Every backward is another convt_ext op, called through the
// dispatcher, so double backward records through these same kernels.
//
//   op                 grad wrt its image input          grad wrt the other input
//   im2col             col2im                            -
//   col2im             im2col                            -
//   convNd             conv_transposeNd                  convNd_weight
//   conv_transposeNd   convNd                            convNd_weight (roles swapped)
//   convNd_weight      conv_transposeNd (wrt input)      convNd (wrt grad_output)
//
// Note [Autograd in C++, and where Python keeps it]
// A call that records no graph goes straight below autograd, and one on
// plain tensors that does records one C++ node (torch::autograd::Function),
// so an eager training step never enters Python. The Python
// autograd.Functions of convt_ext/_autograd.py keep three kinds of call,
// which the kernel hands to them (python_fallback()):
//   - forward-mode AD: an input with a tangent. A C++ Function has no jvp,
//     and the Python one has (each op is linear in each argument);
//   - torch.func transforms (functorch-wrapped tensors): functorch takes an
//     autograd.Function only through its own Python entry point, so the
//     Python call raises the error that names convt_ext's functions, as
//     before;
//   - tracing (torch.compile, export, fake or functional tensors, symbolic
//     sizes): traced once, where the Python formulas work on SymInts.
// The formulas are the same in both places, each citing the relation it uses.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/sum.h>
#include <c10/util/strides.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/library.h>

#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "conv/args.h"
#include "op_handles.h"

namespace convt_ext {

namespace {

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Ints = std::vector<int64_t>;

// ---- the ops, as the backward formulas call them

c10::SymIntArrayRef sym(const Ints& v) { return c10::fromIntArrayRefSlow(v); }

const OpHandles& ops() { return op_handles(); }

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                const Ints& stride, const Ints& padding, const Ints& dilation, int64_t groups) {
  return ops().conv[stride.size() - 1].call(x, w, b, sym(stride), sym(padding), sym(dilation), groups);
}

at::Tensor conv_transpose(const at::Tensor& x, const at::Tensor& w, const Ints& stride,
                          const Ints& padding, const Ints& output_padding, int64_t groups,
                          const Ints& dilation) {
  return ops().conv_transpose[stride.size() - 1].call(x, w, std::nullopt, sym(stride), sym(padding),
                                                      sym(output_padding), groups, sym(dilation));
}

at::Tensor conv_weight(const at::Tensor& x, const at::Tensor& dy, at::IntArrayRef weight_size,
                       const Ints& stride, const Ints& padding, const Ints& dilation, int64_t groups) {
  return ops().conv_weight[stride.size() - 1].call(x, dy, c10::fromIntArrayRefSlow(weight_size),
                                                   sym(stride), sym(padding), sym(dilation), groups);
}

// ---- shared pieces

// The output_padding with which a transposed convolution of `size` window
// positions has `target` pixels: the inverse of relationship 14 (with dilation).
int64_t output_padding_to_reach(int64_t size, int64_t target, int64_t kernel, int64_t stride,
                                int64_t padding, int64_t dilation) {
  return target - ((size - 1) * stride + dilation * (kernel - 1) + 1 - 2 * padding);
}

// t cropped to like's spatial size. A transposed convolution with
// output_padding >= stride owns fewer windows than its output image has, so
// the natural size of its adjoint can overshoot.
at::Tensor crop_to(const at::Tensor& t, const at::Tensor& like) {
  at::Tensor out = t;
  for (int64_t i = 2; i < t.dim(); ++i) {
    if (out.size(i) != like.size(i)) out = out.narrow(i, 0, like.size(i));
  }
  return out;
}

// The memory format the forward gave its output: the op gives it torch's
// exact strides for that format, so they name it; ask() (torch's choice,
// asked again) only where two formats give the same strides.
template <typename Ask>
at::MemoryFormat format_of_output(const at::Tensor& out, const Ask& ask) {
  if (out.dim() < 4) return at::MemoryFormat::Contiguous;
  const at::IntArrayRef s = out.strides();
  const c10::DimVector planar_v = c10::contiguous_strides(out.sizes());
  const std::vector<int64_t> last_v = out.dim() == 4 ? c10::get_channels_last_strides_2d(out.sizes())
                                                     : c10::get_channels_last_strides_3d(out.sizes());
  const at::IntArrayRef planar(planar_v), last(last_v);
  if (planar != last && (s == planar || s == last)) {
    return s == planar ? at::MemoryFormat::Contiguous : channels_last_of(out.dim());
  }
  return ask();
}

at::Tensor formatted(const at::Tensor& t, int64_t format) {
  return t.defined() ? in_format(t, static_cast<at::MemoryFormat>(format)) : t;
}

// The bias gradient: the upstream gradient summed over all but the channels.
at::Tensor bias_grad(const at::Tensor& grad) {
  std::vector<int64_t> dims{0};
  for (int64_t i = 2; i < grad.dim(); ++i) dims.push_back(i);
  return grad.sum(dims);
}

// A Function's argument lists, kept in its context as one flat list.
void keep(AutogradContext* ctx, std::initializer_list<Ints> lists) {
  Ints flat;
  for (const Ints& l : lists) flat.insert(flat.end(), l.begin(), l.end());
  ctx->saved_data["lists"] = static_cast<int64_t>(lists.size());
  ctx->saved_data["args"] = std::move(flat);
}
std::vector<Ints> kept(AutogradContext* ctx) {
  const Ints flat = ctx->saved_data["args"].toIntVector();
  const size_t count = static_cast<size_t>(ctx->saved_data["lists"].toInt()), d = flat.size() / count;
  std::vector<Ints> out;
  for (size_t i = 0; i < count; ++i) out.emplace_back(flat.begin() + i * d, flat.begin() + (i + 1) * d);
  return out;
}

// What a convolution's backward reads back: the two saved tensors, the
// argument lists and the groups.
struct Kept {
  at::Tensor first, second;
  std::vector<Ints> lists;
  int64_t groups;
};
Kept read_back(AutogradContext* ctx) {
  const variable_list saved = ctx->get_saved_variables();
  return {saved[0], saved[1], kept(ctx), ctx->saved_data["groups"].toInt()};
}

// ---- the Functions

struct Im2colFunction : torch::autograd::Function<Im2colFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const Ints& kernel_size,
                            const Ints& dilation, const Ints& padding, const Ints& stride) {
    const int64_t d = static_cast<int64_t>(kernel_size.size());
    ctx->saved_data["image"] = input.sizes().slice(input.dim() - d).vec();
    keep(ctx, {kernel_size, dilation, padding, stride});
    return ops().im2col.call(input, sym(kernel_size), sym(dilation), sym(padding), sym(stride));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // <im2col(x), g> = <x, col2im(g)>: the adjoint of im2col is col2im.
    const std::vector<Ints> a = kept(ctx);
    const Ints image = ctx->saved_data["image"].toIntVector();
    return {ops().col2im.call(grads[0], sym(image), sym(a[0]), sym(a[1]), sym(a[2]), sym(a[3])),
            {}, {}, {}, {}};
  }
};

struct Col2imFunction : torch::autograd::Function<Col2imFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const Ints& output_size,
                            const Ints& kernel_size, const Ints& dilation, const Ints& padding,
                            const Ints& stride) {
    keep(ctx, {kernel_size, dilation, padding, stride});
    return ops().col2im.call(input, sym(output_size), sym(kernel_size), sym(dilation), sym(padding),
                             sym(stride));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<Ints> a = kept(ctx);
    return {ops().im2col.call(grads[0], sym(a[0]), sym(a[1]), sym(a[2]), sym(a[3])), {}, {}, {}, {}, {}};
  }
};

// What conv and conv_transpose keep for backward: the other arguments, and
// the output's memory format, which the input and weight gradients take.
void save_convolution(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                      bool has_bias, std::initializer_list<Ints> args, int64_t groups, at::MemoryFormat format) {
  ctx->save_for_backward({input, weight});
  ctx->saved_data["has_bias"] = has_bias;
  keep(ctx, args);
  ctx->saved_data["groups"] = groups;
  ctx->saved_data["format"] = static_cast<int64_t>(format);
}

variable_list convolution_grads(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& gi,
                                const at::Tensor& gw, size_t rest) {
  const int64_t format = ctx->saved_data["format"].toInt();
  variable_list out{formatted(gi, format), formatted(gw, format), {}};
  if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) out[2] = bias_grad(grad);
  out.resize(3 + rest);
  return out;
}

struct ConvFunction : torch::autograd::Function<ConvFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const Ints& stride,
                            const Ints& padding, const Ints& dilation, int64_t groups) {
    const at::Tensor out = conv(input, weight, bias, stride, padding, dilation, groups);
    const at::MemoryFormat format = format_of_output(
        out, [&] { return conv_format(input, weight, bias, stride, padding, dilation, groups); });
    save_convolution(ctx, input, weight, bias.has_value(), {stride, padding, dilation},
                     groups, format);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Kept k = read_back(ctx);
    const at::Tensor &input = k.first, &weight = k.second, &grad = grads[0];
    const Ints &stride = k.lists[0], &padding = k.lists[1], &dilation = k.lists[2];
    const int64_t groups = k.groups;
    at::Tensor gi, gw;
    if (ctx->needs_input_grad(0)) {
      // The input gradient is C^T applied to the upstream gradient: a
      // transposed convolution, with the output_padding that brings the size
      // back to the input's.
      Ints output_padding(stride.size());
      for (size_t i = 0; i < stride.size(); ++i) {
        output_padding[i] = output_padding_to_reach(grad.size(2 + i), input.size(2 + i),
                                                    weight.size(2 + i), stride[i], padding[i], dilation[i]);
      }
      gi = conv_transpose(grad, weight, stride, padding, output_padding, groups, dilation);
    }
    if (ctx->needs_input_grad(1)) gw = conv_weight(input, grad, weight.sizes(), stride, padding, dilation, groups);
    return convolution_grads(ctx, grad, gi, gw, 4);
  }
};

struct ConvTransposeFunction : torch::autograd::Function<ConvTransposeFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const Ints& stride,
                            const Ints& padding, const Ints& output_padding, int64_t groups,
                            const Ints& dilation) {
    const at::Tensor out = ops().conv_transpose[stride.size() - 1].call(
        input, weight, bias, sym(stride), sym(padding), sym(output_padding), groups, sym(dilation));
    const at::MemoryFormat format = format_of_output(out, [&] {
      return output_format(input, weight, bias, stride, padding, dilation, true, output_padding, groups);
    });
    save_convolution(ctx, input, weight, bias.has_value(),
                     {stride, padding, output_padding, dilation}, groups, format);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Kept k = read_back(ctx);
    const at::Tensor &input = k.first, &weight = k.second, &grad = grads[0];
    const Ints &stride = k.lists[0], &padding = k.lists[1], &output_padding = k.lists[2], &dilation = k.lists[3];
    const int64_t groups = k.groups;
    at::Tensor gi, gw;
    if (ctx->needs_input_grad(0) && ctx->needs_input_grad(1) && !at::GradMode::is_enabled()) {
      // Both from one im2col of grad (Note [One column buffer for
      // conv_transpose's backward] in conv/columns.cpp); the two calls below
      // state the same, and are differentiable for double backward.
      std::tie(gi, gw) = ops().fused.call(grad, input, weight, sym(stride), sym(padding),
                                          sym(output_padding), groups, sym(dilation));
      return convolution_grads(ctx, grad, gi, gw, 5);
    }
    // The adjoint of a transposed convolution is the direct one.
    if (ctx->needs_input_grad(0)) gi = crop_to(conv(grad, weight, std::nullopt, stride, padding, dilation, groups), input);
    if (ctx->needs_input_grad(1)) gw = conv_weight(grad, input, weight.sizes(), stride, padding, dilation, groups);
    return convolution_grads(ctx, grad, gi, gw, 5);
  }
};

struct ConvWeightFunction : torch::autograd::Function<ConvWeightFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& grad_output,
                            const Ints& weight_size, const Ints& stride, const Ints& padding,
                            const Ints& dilation, int64_t groups) {
    ctx->save_for_backward({input, grad_output});
    keep(ctx, {stride, padding, dilation});
    ctx->saved_data["groups"] = groups;
    return conv_weight(input, grad_output, weight_size, stride, padding, dilation, groups);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // conv_weight(x, dy) is bilinear: <G, conv_weight(x, dy)> = <conv(x, G), dy>
    // = <x, conv_transpose(dy, G)>.
    const Kept k = read_back(ctx);
    const at::Tensor &input = k.first, &grad_output = k.second, &grad = grads[0];
    const Ints &stride = k.lists[0], &padding = k.lists[1], &dilation = k.lists[2];
    const int64_t groups = k.groups;
    const size_t d = stride.size();
    at::Tensor gi, gdy;
    if (ctx->needs_input_grad(0)) {
      // dy may cover fewer windows than x has (the weight gradient of a
      // transposed convolution with output_padding >= stride). The missing
      // windows contribute nothing, so give them zeros: then the
      // output_padding that restores x's size is the natural one.
      Ints natural(d), output_padding(d);
      std::vector<int64_t> pad;
      bool short_of = false;
      for (size_t i = 0; i < d; ++i) {
        natural[i] = (input.size(2 + i) + 2 * padding[i] - dilation[i] * (grad.size(2 + i) - 1) - 1) / stride[i] + 1;
        output_padding[i] = output_padding_to_reach(natural[i], input.size(2 + i), grad.size(2 + i),
                                                    stride[i], padding[i], dilation[i]);
        short_of |= natural[i] != grad_output.size(2 + i);
      }
      for (size_t i = d; i-- > 0;) pad.insert(pad.end(), {0, natural[i] - grad_output.size(2 + i)});
      const at::Tensor dy = short_of ? at::constant_pad_nd(grad_output, pad, 0) : grad_output;
      gi = conv_transpose(dy, grad, stride, padding, output_padding, groups, dilation);
    }
    if (ctx->needs_input_grad(1)) {
      gdy = crop_to(conv(input, grad, std::nullopt, stride, padding, dilation, groups), grad_output);
    }
    return {gi, gdy, {}, {}, {}, {}, {}};
  }
};

// ---- the kernels

bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }

// Whether a call on these tensors records a graph: a floating or complex
// first input, grad mode on, and an input that requires grad or carries a
// forward-mode tangent.
bool needs_graph(std::initializer_list<const at::Tensor*> ts) {
  const at::Tensor& first = **ts.begin();
  if (!at::GradMode::is_enabled() || !(first.is_floating_point() || first.is_complex())) return false;
  for (const at::Tensor* t : ts) {
    if (t->defined() && (t->requires_grad() || has_tangent(*t))) return true;
  }
  return false;
}

// Note [Autograd in C++, and where Python keeps it]: the calls the Python
// autograd.Functions take.
bool python_fallback(std::initializer_list<const at::Tensor*> ts) {
  const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                    c10::DispatchKey::FuncTorchGradWrapper,
                                    c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::Functionalize});
  for (const at::Tensor* t : ts) {
    if (!t->defined()) continue;
    if (has_tangent(*t) || t->key_set().has_any(traced) ||
        t->unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
      return true;
    }
  }
  return false;
}

// The Python side's entry (convt_ext/_autograd.py), set on import.
py::object& python_autograd() {
  static py::object* f = new py::object();  // leaked: no Python call at exit
  return *f;
}

// The call handed to Python, on the stack's arguments.
void call_python(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  py::gil_scoped_acquire gil;
  TORCH_CHECK(python_autograd(), "convt_ext: the Python autograd module is not loaded");
  const size_t n = op.schema().arguments().size();
  py::tuple args(n + 1);
  args[0] = py::str(op.schema().name().substr(std::string("convt_ext::").size()));
  for (size_t i = 0; i < n; ++i) args[i + 1] = torch::jit::toPyObject(std::move((*stack)[stack->size() - n + i]));
  torch::jit::drop(*stack, n);
  const py::object out = python_autograd()(*args);
  stack->emplace_back(out.cast<at::Tensor>());
}

// An argument as plain ints, or nothing where it is symbolic.
// Also nothing where a value is past a SymInt's range (below -2^62): the
// formulas pass lists to the ops as SymInts, and such a call is refused by
// the op's own checks, which the Python Function reaches with plain ints.
std::optional<Ints> concrete_list(const c10::IValue& v) {
  if (v.isIntList()) {
    Ints out = v.toIntVector();
    for (int64_t i : out) {
      if (!c10::SymInt::check_range(i)) return std::nullopt;
    }
    return out;
  }
  const std::vector<c10::SymInt> sv = v.toSymIntVector();
  const auto opt = c10::asIntArrayRefSlowOpt(sv);
  return opt ? std::optional<Ints>(opt->vec()) : std::nullopt;
}
std::optional<int64_t> concrete_int(const c10::IValue& v) {
  return v.isInt() ? std::optional<int64_t>(v.toInt()) : v.toSymInt().maybe_as_int();
}

// The op's C++ Function on its arguments (a, the stack's last ones), or an
// undefined tensor where one is symbolic.
at::Tensor apply_function(const std::string& name, const c10::IValue* a, size_t n) {
  std::vector<Ints> lists;
  std::optional<int64_t> groups = 0;
  for (size_t i = 1; i < n; ++i) {
    if (a[i].isTensor() || a[i].isNone()) continue;
    if (i == 6) {  // conv, conv_transpose and conv_weight: groups
      groups = concrete_int(a[i]);
      continue;
    }
    std::optional<Ints> v = concrete_list(a[i]);
    if (!v) return {};
    lists.push_back(std::move(*v));
  }
  if (!groups) return {};
  const at::Tensor& x = a[0].toTensor();
  if (name == "im2col") return Im2colFunction::apply(x, lists[0], lists[1], lists[2], lists[3]);
  if (name == "col2im") return Col2imFunction::apply(x, lists[0], lists[1], lists[2], lists[3], lists[4]);
  const at::Tensor& y = a[1].toTensor();
  if (name.size() > 7 && name.compare(name.size() - 7, 7, "_weight") == 0) {
    return ConvWeightFunction::apply(x, y, lists[0], lists[1], lists[2], lists[3], *groups);
  }
  const std::optional<at::Tensor> bias = a[2].toOptional<at::Tensor>();
  if (name.rfind("conv_transpose", 0) == 0) {
    return ConvTransposeFunction::apply(x, y, bias, lists[0], lists[1], lists[2], *groups, lists[3]);
  }
  return ConvFunction::apply(x, y, bias, lists[0], lists[1], lists[2], *groups);
}

// One boxed kernel for every differentiable op: below autograd where no
// graph is recorded, the Python Functions where Note [Autograd in C++, and
// where Python keeps it] says, else the op's C++ Function.
void autograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  const c10::IValue* a = stack->data() + stack->size() - n;
  const at::Tensor none;
  const auto tensor = [&](size_t i) -> const at::Tensor& { return a[i].isTensor() ? a[i].toTensor() : none; };
  const at::Tensor &x = tensor(0), &y = tensor(1), &b = tensor(2);
  if (!needs_graph({&x, &y, &b})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
    return;
  }
  if (python_fallback({&x, &y, &b})) return call_python(op, stack);
  const std::string name = op.schema().name().substr(std::string("convt_ext::").size());
  at::Tensor out = apply_function(name, a, n);
  if (!out.defined()) return call_python(op, stack);
  torch::jit::drop(*stack, n);
  stack->emplace_back(std::move(out));
}

}  // namespace

const OpHandles& op_handles() {
  static const OpHandles h = [] {
    const auto find = [](const std::string& name) {
      return c10::Dispatcher::singleton().findSchemaOrThrow(("convt_ext::" + name).c_str(), "");
    };
    OpHandles h{find("im2col").typed<Im2colSig>(), find("col2im").typed<Col2imSig>(),
                find("_conv_transpose_backward").typed<FusedSig>(), {}, {}, {}};
    for (const char* d : {"1", "2", "3"}) {
      h.conv.push_back(find(std::string("conv") + d + "d").typed<ConvSig>());
      h.conv_transpose.push_back(find(std::string("conv_transpose") + d + "d").typed<ConvTransposeSig>());
      h.conv_weight.push_back(find(std::string("conv") + d + "d_weight").typed<ConvWeightSig>());
    }
    return h;
  }();
  return h;
}

void set_python_autograd(py::object f) { python_autograd() = std::move(f); }

}  // namespace convt_ext

TORCH_LIBRARY_IMPL(convt_ext, Autograd, m) {
  const std::vector<std::string> names{"im2col", "col2im", "conv1d", "conv2d", "conv3d",
                                       "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                                       "conv1d_weight", "conv2d_weight", "conv3d_weight"};
  for (const std::string& name : names) {
    m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&convt_ext::autograd_kernel>());
  }
  // out= has no derivative, as torch's out= functions.
  m.impl("im2col.out", torch::autograd::autogradNotImplementedFallback());
  m.impl("col2im.out", torch::autograd::autogradNotImplementedFallback());
}
