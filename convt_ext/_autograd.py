"""Derivatives of the torch.ops.convt_ext ops, reverse and forward mode, in
Python, and the differentiable calls that convt_ext.functional makes. The ops'
Autograd kernels are C++ (csrc/autograd.cpp); importing this module gives them
the Python entry they hand some calls to (Note [Autograd and torch.func]).

The autograd formulas are the point of the library: every backward is another
convt_ext op, so double backward works and the duality is plain to see. Every
op is linear in each argument, so each tangent is the op itself applied to it.

    op                 grad wrt its image input          grad wrt the other input
    im2col             col2im                            -
    col2im             im2col                            -
    convNd             conv_transposeNd                  convNd_weight
    conv_transposeNd   convNd                            convNd_weight (roles swapped)
    convNd_weight      conv_transposeNd (wrt input)      convNd (wrt grad_output)

for N = 1, 2, 3, with one generic formula per op.
"""
import torch
import torch.nn.functional as F

from ._fake import conv_format, conv_transpose_format
from ._geometry import output_padding_to_reach, windows
from . import _C
from ._ops import apply, below_autograd, call, ops, ops_for, transforms_active, unpack

# Note [Autograd and torch.func]
# Each op's derivatives live twice, with the same formulas: in C++
# (csrc/autograd.cpp, the ops' Autograd kernels, one torch::autograd::Function
# per op) and in one torch.autograd.Function per op below (backward, and jvp
# for forward mode). The C++ kernels take every eager call, so building a
# graph and its backward never enter Python; they hand three kinds of call to
# the Functions here (Note [Autograd in C++, and where Python keeps it] in
# csrc/autograd.cpp):
#   - forward-mode AD (torch.autograd.forward_ad): a C++ Function has no jvp;
#   - torch.func transforms (grad, jvp, vjp, jacrev, jacfwd, hessian, vmap):
#     functorch can only take an autograd.Function through its own entry
#     point, before the dispatcher, so the Python calls (the functions just
#     below, through convt_ext._ops.call, and every backward and jvp formula)
#     apply it there, and a torch.ops call under a transform is refused with
#     the name of the function to call instead;
#   - tracing (torch.compile, export: fake or functional tensors, symbolic
#     sizes), which runs once per graph and where these formulas work on SymInts.
# The vmap rules (convt_ext/_vmap.py) fold the vmapped dimension into the
# batch, or into the groups when a weight is vmapped.

# ---------------------------------------------------------------- the calls


def im2col(input, kernel_size, dilation, padding, stride):
    return call(Im2col, ops.im2col, _C._call_im2col, input, kernel_size, dilation, padding, stride)


def col2im(input, output_size, kernel_size, dilation, padding, stride):
    return call(Col2im, ops.col2im, _C._call_col2im, input, output_size, kernel_size, dilation, padding, stride)


def conv(input, weight, bias, stride, padding, dilation, groups):
    return call(Conv, _CONV[len(stride)], _C._call_conv, input, weight, bias, stride, padding, dilation, groups)


def conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation):
    return call(ConvTranspose, _CONV_TRANSPOSE[len(stride)], _C._call_conv_transpose,
                input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_weight(input, grad_output, weight_size, stride, padding, dilation, groups):
    return call(ConvWeight, _CONV_WEIGHT[len(stride)], _C._call_conv_weight,
                input, grad_output, weight_size, stride, padding, dilation, groups)


# The ops by number of spatial dimensions, looked up once.
_CONV, _CONV_TRANSPOSE, _CONV_WEIGHT = ({d: ops_for(d)[i] for d in (1, 2, 3)} for i in range(3))


# ---------------------------------------------------------------- shared pieces


def _sum_present(*terms):
    """The sum of the terms that are not None (a tangent's parts)."""
    terms = [t for t in terms if t is not None]
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _strides(shape, fmt):
    """The strides torch gives a new tensor of `shape` in memory format fmt
    (c10's contiguous_strides and get_channels_last_strides_{2,3}d), computed
    without allocating one."""
    if fmt == torch.contiguous_format:
        order = range(len(shape) - 1, -1, -1)
    else:  # channels_last(_3d): the channels fastest, then the spatial dims, the batch last
        order = [1, *range(len(shape) - 1, 1, -1), 0]
    strides, step = [0] * len(shape), 1
    for i in order:
        strides[i] = step
        step *= max(shape[i], 1) if fmt == torch.contiguous_format else shape[i]
    return tuple(strides)


def _in_format(t, fmt):
    """t with the strides torch gives a gradient of format fmt, that of the
    forward's output (Note [Memory format] in csrc/conv/args.cpp). Not under
    torch.func, whose vmap has no channels_last."""
    if t is None or fmt is None or transforms_active():
        return t
    # Not t.contiguous(memory_format=fmt), which keeps t where two formats
    # coincide (size-1 dimensions) though its strides differ from torch's.
    return t if t.stride() == _strides(t.shape, fmt) else t.clone(memory_format=fmt)


def _format_of_output(output, ask):
    """The memory format the forward gave its output: the op gives it torch's
    exact strides for that format, so they name it, and ask() (torch's choice,
    asked again) is needed only where two formats give the same strides."""
    if output.dim() < 4:
        return torch.contiguous_format
    channels_last = torch.channels_last if output.dim() == 4 else torch.channels_last_3d
    planar, last = _strides(output.shape, torch.contiguous_format), _strides(output.shape, channels_last)
    if planar != last and output.stride() in (planar, last):
        return torch.contiguous_format if output.stride() == planar else channels_last
    return ask()


def _forward(select):
    """A Function's forward: the op that select(inputs) names, below autograd."""
    return staticmethod(lambda *inputs: below_autograd(select(inputs), *unpack(inputs)))


def _save(ctx, *tensors):
    """Tensors for both backward and jvp."""
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)


def _crop_to(t, like):
    """t cropped to like's spatial size. A transposed convolution with
    output_padding >= stride owns fewer windows than its output image has
    (see csrc/im2col.h), so the natural size of its adjoint can overshoot."""
    return t[(Ellipsis,) + tuple(slice(0, n) for n in like.shape[2:])]


# ---------------------------------------------------------------- im2col and col2im


class Im2col(torch.autograd.Function):
    generate_vmap_rule = True
    tensor_args = 1
    forward = _forward(lambda inputs: ops.im2col)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, kernel_size, dilation, padding, stride = unpack(inputs)
        ctx.image_size = input.shape[-len(kernel_size) :]
        ctx.args = (kernel_size, dilation, padding, stride)

    @staticmethod
    def backward(ctx, grad):
        # <im2col(x), g> = <x, col2im(g)>: the adjoint of im2col is col2im.
        return col2im(grad, ctx.image_size, *ctx.args), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return im2col(tangent, *ctx.args)


class Col2im(torch.autograd.Function):
    generate_vmap_rule = True
    tensor_args = 1
    forward = _forward(lambda inputs: ops.col2im)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.output_size, *ctx.args = unpack(inputs)

    @staticmethod
    def backward(ctx, grad):
        return im2col(grad, *ctx.args), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return col2im(tangent, ctx.output_size, *ctx.args)


# ---------------------------------------------------------------- convolutions


def _setup_convolution(ctx, inputs, output, format_of):
    """setup_context of conv and conv_transpose: input and weight saved, the
    other arguments kept, and the memory format of the output (Not under
    torch.func: see _in_format), read from the output in eager mode, so that
    a call asks torch for it once, in the op."""
    input, weight, bias, *args = unpack(inputs)
    _save(ctx, input, weight)
    ctx.has_bias = bias is not None
    ctx.args = tuple(args)
    ask = lambda: format_of(input, weight, bias, *args)  # noqa: E731
    if transforms_active():
        ctx.format = None
    elif torch.compiler.is_compiling():
        ctx.format = ask()
    else:
        ctx.format = _format_of_output(output, ask)


def _convolution_grads(ctx, grad, grad_input, grad_weight):
    """A convolution's backward result: the input and weight gradients in the
    forward's memory format, the bias gradient (the upstream gradient summed
    over all but the channels), nothing for the Args."""
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad.sum((0,) + tuple(range(2, grad.dim())))
    return _in_format(grad_input, ctx.format), _in_format(grad_weight, ctx.format), grad_bias, None


def _convolution_jvp(op, ctx, t_input, t_weight, t_bias):
    """The tangent of op(input, weight, bias, *ctx.args), linear in each of
    the three: op(t_input, weight, t_bias) + op(input, t_weight), any of the
    tangents absent."""
    input, weight = ctx.saved_tensors
    terms = []
    if t_input is not None:
        terms.append(op(t_input, weight, t_bias, *ctx.args))
        t_bias = None
    if t_weight is not None:
        terms.append(op(input, t_weight, t_bias, *ctx.args))
        t_bias = None
    if t_bias is not None:  # the bias's alone: broadcast over the output's shape
        like = op(input, weight, None, *ctx.args)
        terms.append(t_bias.view((1, -1) + (1,) * (like.dim() - 2)).expand_as(like).clone())
    return _sum_present(*terms)


class Conv(torch.autograd.Function):
    generate_vmap_rule = True
    tensor_args = 3
    forward = _forward(lambda inputs: ops_for(inputs[1].dim() - 2)[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_convolution(ctx, inputs, output, conv_format)

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        d = len(stride)
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            # The input gradient is C^T applied to the upstream gradient: a transposed
            # convolution, with the output_padding that brings the size back to the input's.
            output_padding = [
                output_padding_to_reach(grad.shape[2 + i], input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
                for i in range(d)
            ]
            grad_input = conv_transpose(grad, weight, None, stride, padding, output_padding, groups, dilation)
        if ctx.needs_input_grad[1]:
            grad_weight = conv_weight(input, grad, weight.shape, stride, padding, dilation, groups)
        return _convolution_grads(ctx, grad, grad_input, grad_weight)

    @staticmethod
    def jvp(ctx, t_input, t_weight, t_bias, _):
        return _convolution_jvp(conv, ctx, t_input, t_weight, t_bias)


class ConvTranspose(torch.autograd.Function):
    generate_vmap_rule = True
    tensor_args = 3
    forward = _forward(lambda inputs: ops_for(inputs[1].dim() - 2)[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_convolution(ctx, inputs, output, conv_transpose_format)

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        stride, padding, output_padding, groups, dilation = ctx.args
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and not torch.is_grad_enabled() and not transforms_active():
            # Both from one im2col of grad (Note [One column buffer for
            # conv_transpose's backward] in csrc/conv/columns.cpp); the two ops below
            # state the same, and are differentiable for double backward.
            grad_input, grad_weight = ops._conv_transpose_backward(
                grad, input, weight, stride, padding, output_padding, groups, dilation
            )
            return _convolution_grads(ctx, grad, grad_input, grad_weight)
        if ctx.needs_input_grad[0]:
            # The adjoint of a transposed convolution is the direct one.
            grad_input = _crop_to(conv(grad, weight, None, stride, padding, dilation, groups), input)
        if ctx.needs_input_grad[1]:
            grad_weight = conv_weight(grad, input, weight.shape, stride, padding, dilation, groups)
        return _convolution_grads(ctx, grad, grad_input, grad_weight)

    @staticmethod
    def jvp(ctx, t_input, t_weight, t_bias, _):
        return _convolution_jvp(conv_transpose, ctx, t_input, t_weight, t_bias)


class ConvWeight(torch.autograd.Function):
    generate_vmap_rule = True
    tensor_args = 2
    forward = _forward(lambda inputs: ops_for(inputs[0].dim() - 2)[2])

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, grad_output, weight_size, stride, padding, dilation, groups = unpack(inputs)
        _save(ctx, input, grad_output)
        ctx.weight_size = weight_size
        ctx.args = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        # conv_weight(x, dy) is bilinear: <G, conv_weight(x, dy)> = <conv(x, G), dy>
        # = <x, conv_transpose(dy, G)>.
        input, grad_output = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        d = grad.dim() - 2
        grad_input = grad_grad_output = None
        if ctx.needs_input_grad[0]:
            # dy may cover fewer windows than x has (the weight gradient of a transposed
            # convolution with output_padding >= stride). The missing windows contribute
            # nothing, so give them zeros: then the output_padding that restores x's size
            # is the natural one, below the stride.
            natural = windows(input.shape[2:], grad.shape[2:], stride, padding, dilation)
            short = [natural[i] - grad_output.shape[2 + i] for i in range(d)]
            pad = [p for i in reversed(range(d)) for p in (0, short[i])]
            dy = F.pad(grad_output, pad) if any(short) else grad_output
            output_padding = [
                output_padding_to_reach(natural[i], input.shape[2 + i], grad.shape[2 + i], stride[i], padding[i], dilation[i])
                for i in range(d)
            ]
            grad_input = conv_transpose(dy, grad, None, stride, padding, output_padding, groups, dilation)
        if ctx.needs_input_grad[1]:
            grad_grad_output = _crop_to(conv(input, grad, None, stride, padding, dilation, groups), grad_output)
        return grad_input, grad_grad_output, None

    @staticmethod
    def jvp(ctx, t_input, t_grad_output, _):
        input, grad_output = ctx.saved_tensors
        out = None
        if t_input is not None:
            out = conv_weight(t_input, grad_output, ctx.weight_size, *ctx.args)
        if t_grad_output is not None:
            out = _sum_present(out, conv_weight(input, t_grad_output, ctx.weight_size, *ctx.args))
        return out


# ---------------------------------------------------------------- the C++ kernels' Python calls


def _python_autograd(name, *args):
    """The calls the ops' C++ Autograd kernels (csrc/autograd.cpp) hand to
    Python: forward-mode AD, torch.func transforms and tracing (Note
    [Autograd in C++, and where Python keeps it]). Called only where the call
    records derivatives."""
    if transforms_active():
        raise RuntimeError(
            f"torch.ops.convt_ext.{name} was called under a torch.func transform with inputs "
            f"that need derivatives; call convt_ext.{name}() (the Python function) instead, "
            f"which carries its derivatives to torch.func"
        )
    return apply(_FUNCTIONS[name], args)


_FUNCTIONS = {"im2col": Im2col, "col2im": Col2im}
for _d in (1, 2, 3):
    _FUNCTIONS.update({f"conv{_d}d": Conv, f"conv_transpose{_d}d": ConvTranspose, f"conv{_d}d_weight": ConvWeight})

_C._set_python_autograd(_python_autograd)
