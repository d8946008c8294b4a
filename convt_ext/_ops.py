"""Fake (meta) kernels, autograd (reverse and forward mode) and vmap rules for
the torch.ops.convt_ext ops.

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
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

from . import _C  # noqa: F401  (loads the library that defines the ops)

ops = torch.ops.convt_ext


from ._geometry import INT64_MAX, output_padding_to_reach, transposed_size, window_count  # noqa: F401
from ._geometry import checked as _checked
from ._geometry import prod as _prod
from ._geometry import windows as _windows


def _spatial_dims_of_grad(grad):
    return tuple(range(2, grad.dim()))


def _output_format(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """The memory format torch's own convolution gives its output (and
    gradients) for these arguments, asked of torch as its fake kernels do:
    Note [Memory format] in csrc/conv.cpp, which asks the same."""
    if weight.dim() < 4:
        return torch.contiguous_format
    if transposed and weight.shape[0] == 0:
        # The one shape that passes convt_ext's checks and not torch's (zero input
        # channels of conv_transpose); anything else torch refuses is an error.
        return torch.contiguous_format
    backend = torch._C._select_conv_backend(
        input, weight, bias, list(stride), list(padding), list(dilation), transposed, list(output_padding), groups
    )
    return torch._C._conv_determine_backend_memory_format(input, weight, backend)


def _conv_format(input, weight, bias, stride, padding, dilation, groups):
    return _output_format(input, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)


def _conv_transpose_format(input, weight, bias, stride, padding, output_padding, groups, dilation):
    return _output_format(input, weight, bias, stride, padding, dilation, True, output_padding, groups)


def _conv_weight_format(input, weight_size, stride, padding, dilation, groups):
    """torch.nn.grad's: that of the convolution with a new, contiguous weight."""
    weight = torch.empty(tuple(weight_size), dtype=input.dtype, device=input.device)
    return _conv_format(input, weight, None, stride, padding, dilation, groups)


def _empty(like, shape, memory_format=torch.contiguous_format):
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


# ---------------------------------------------------------------- fake kernels


def _im2col_fake(input, kernel_size, dilation, padding, stride):
    d = len(kernel_size)
    windows = _windows(input.shape[-d:], kernel_size, stride, padding, dilation, "im2col")
    shape = (input.shape[-d - 1] * _prod(kernel_size), _checked("im2col", "the window count", _prod(windows)))
    return input.new_empty(input.shape[: -d - 1] + shape)


def _col2im_fake(input, output_size, kernel_size, dilation, padding, stride):
    channels = input.shape[-2] // _prod(kernel_size)
    return input.new_empty(input.shape[:-2] + (channels,) + tuple(output_size))


def _check_out(op, out, like):
    """Fake kernels of the out= variants: the real op's shape rule on out."""
    if tuple(out.shape) != tuple(like.shape):
        raise ValueError(f"{op}: out must have shape {tuple(like.shape)}, but got {tuple(out.shape)}")


@torch.library.register_fake("convt_ext::im2col.out")
def _im2col_out_fake(input, kernel_size, dilation, padding, stride, *, out):
    _check_out("im2col", out, _im2col_fake(input, kernel_size, dilation, padding, stride))


@torch.library.register_fake("convt_ext::col2im.out")
def _col2im_out_fake(input, output_size, kernel_size, dilation, padding, stride, *, out):
    _check_out("col2im", out, _col2im_fake(input, output_size, kernel_size, dilation, padding, stride))


def _conv_fake(input, weight, bias, stride, padding, dilation, groups):
    windows = _windows(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    fmt = _conv_format(input, weight, bias, stride, padding, dilation, groups)
    return _empty(input, (input.shape[0], weight.shape[0], *windows), fmt)


def _conv_transpose_fake(input, weight, bias, stride, padding, output_padding, groups, dilation):
    d = weight.dim() - 2
    size = [
        _checked(
            "conv_transpose",
            "the output size",
            transposed_size(input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], output_padding[i], dilation[i]),
        )
        for i in range(d)
    ]
    fmt = _conv_transpose_format(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return _empty(input, (input.shape[0], weight.shape[1] * groups, *size), fmt)


def _conv_weight_fake(input, grad_output, weight_size, stride, padding, dilation, groups):
    return _empty(input, tuple(weight_size), _conv_weight_format(input, weight_size, stride, padding, dilation, groups))


@torch.library.register_fake("convt_ext::_conv_transpose_backward")
def _conv_transpose_backward_fake(grad_output, input, weight, stride, padding, output_padding, groups, dilation):
    expected = _conv_transpose_fake(input, weight, None, stride, padding, output_padding, groups, dilation).shape
    if tuple(grad_output.shape) != tuple(expected):
        raise ValueError(f"_conv_transpose_backward: grad_output must have the output's shape {tuple(expected)}, but got {tuple(grad_output.shape)}")
    return _empty(input, input.shape), _empty(input, weight.shape)


# ---------------------------------------------------------------- calls
#
# Note [Autograd and torch.func]
# Each op's derivatives live in one torch.autograd.Function below (backward,
# and jvp for forward mode), which serves two ways in:
#   - the op's Autograd kernel (_autograd_kernel) applies it whenever an input
#     requires grad or a forward-mode dual level is open, so torch.ops calls
#     get backward, double backward and torch.autograd.forward_ad;
#   - under torch.func transforms (grad, jvp, vjp, jacrev, jacfwd, hessian,
#     vmap), functorch can only take an autograd.Function through its own
#     entry point, before the dispatcher, so the Python calls (_call: the
#     functions below, and every backward and jvp formula) apply it there.
# The vmap rules (_register_vmap) fold the vmapped dimension into the batch,
# or into the groups when a weight is vmapped.


def _transforms_active():
    return torch._C._are_functorch_transforms_active()


class _Args:
    """An op's non-tensor arguments as one opaque value. torch.func flattens
    an autograd.Function's arguments as pytrees but pairs their tangents one
    to one with the arguments, so a tuple argument (a stride) would misalign
    them."""

    __slots__ = ("values",)

    def __init__(self, values):
        self.values = tuple(values)


def _apply(function, args):
    return function.apply(*args[: function.tensors], _Args(args[function.tensors :]))


def _unpack(inputs):
    """An autograd.Function's inputs as the op's arguments."""
    return (*inputs[:-1], *inputs[-1].values)


def _call(function, op, *args):
    if _transforms_active():
        return _apply(function, args)
    return op(*args)


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def im2col(input, kernel_size, dilation, padding, stride):
    return _call(_Im2col, ops.im2col, input, kernel_size, dilation, padding, stride)


def col2im(input, output_size, kernel_size, dilation, padding, stride):
    return _call(_Col2im, ops.col2im, input, output_size, kernel_size, dilation, padding, stride)


def _ops_for(d):
    """The dispatcher ops of one dimension: (conv, conv_transpose, conv_weight)."""
    return (
        getattr(ops, f"conv{d}d"),
        getattr(ops, f"conv_transpose{d}d"),
        getattr(ops, f"conv{d}d_weight"),
    )


def conv(input, weight, bias, stride, padding, dilation, groups):
    return _call(_Conv, _ops_for(len(stride))[0], input, weight, bias, stride, padding, dilation, groups)


def conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation):
    op = _ops_for(len(stride))[1]
    return _call(_ConvTranspose, op, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_weight(input, grad_output, weight_size, stride, padding, dilation, groups):
    op = _ops_for(len(stride))[2]
    return _call(_ConvWeight, op, input, grad_output, weight_size, stride, padding, dilation, groups)


# ---------------------------------------------------------------- derivatives


def _sum(*terms):
    """The sum of the terms that are not None (a tangent's parts)."""
    terms = [t for t in terms if t is not None]
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _in_format(t, fmt):
    """t with the strides torch gives a gradient of format fmt, that of the
    forward's output (Note [Memory format] in csrc/conv.cpp). Not under
    torch.func, whose vmap has no channels_last."""
    if t is None or fmt is None or _transforms_active():
        return t
    # Not t.contiguous(memory_format=fmt), which keeps t where two formats
    # coincide (size-1 dimensions) though its strides differ from torch's.
    out = torch.empty_like(t, memory_format=fmt)
    return t if out.stride() == t.stride() else out.copy_(t)


def _forward(select):
    """A Function's forward: the op that select(inputs) names, below autograd."""
    return staticmethod(lambda *inputs: _below_autograd(select(inputs), *_unpack(inputs)))


def _save(ctx, *tensors):
    """Tensors for both backward and jvp."""
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)


class _Im2col(torch.autograd.Function):
    generate_vmap_rule = True
    tensors = 1
    forward = _forward(lambda inputs: ops.im2col)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, kernel_size, dilation, padding, stride = _unpack(inputs)
        ctx.image_size = input.shape[-len(kernel_size) :]
        ctx.args = (kernel_size, dilation, padding, stride)

    @staticmethod
    def backward(ctx, grad):
        # <im2col(x), g> = <x, col2im(g)>: the adjoint of im2col is col2im.
        return col2im(grad, ctx.image_size, *ctx.args), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return im2col(tangent, *ctx.args)


class _Col2im(torch.autograd.Function):
    generate_vmap_rule = True
    tensors = 1
    forward = _forward(lambda inputs: ops.col2im)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.output_size, *ctx.args = _unpack(inputs)

    @staticmethod
    def backward(ctx, grad):
        return im2col(grad, *ctx.args), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return col2im(tangent, ctx.output_size, *ctx.args)


def _convolution_grads(ctx, grad, grad_input, grad_weight):
    """A convolution's backward result: the input and weight gradients in the
    forward's memory format, the bias gradient (the upstream gradient summed
    over all but the channels), nothing for the _Args."""
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
    return _sum(*terms)


class _Conv(torch.autograd.Function):
    generate_vmap_rule = True
    tensors = 3
    forward = _forward(lambda inputs: _ops_for(inputs[1].dim() - 2)[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups = _unpack(inputs)
        _save(ctx, input, weight)
        ctx.has_bias = bias is not None
        ctx.args = (stride, padding, dilation, groups)
        # (Not under torch.func: see _in_format.)
        ctx.format = None if _transforms_active() else _conv_format(input, weight, bias, stride, padding, dilation, groups)

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


def _crop_to(t, like):
    """t cropped to like's spatial size. A transposed convolution with
    output_padding >= stride owns fewer windows than its output image has
    (see csrc/im2col.h), so the natural size of its adjoint can overshoot."""
    return t[(Ellipsis,) + tuple(slice(0, n) for n in like.shape[2:])]


class _ConvTranspose(torch.autograd.Function):
    generate_vmap_rule = True
    tensors = 3
    forward = _forward(lambda inputs: _ops_for(inputs[1].dim() - 2)[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, output_padding, groups, dilation = _unpack(inputs)
        _save(ctx, input, weight)
        ctx.has_bias = bias is not None
        ctx.args = (stride, padding, output_padding, groups, dilation)
        ctx.format = (
            None if _transforms_active() else _conv_transpose_format(input, weight, bias, *ctx.args)
        )

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        stride, padding, output_padding, groups, dilation = ctx.args
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and not torch.is_grad_enabled() and not _transforms_active():
            # Both from one im2col of grad (Note [One column buffer for
            # conv_transpose's backward] in csrc/conv.cpp); the two ops below
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


class _ConvWeight(torch.autograd.Function):
    generate_vmap_rule = True
    tensors = 2
    forward = _forward(lambda inputs: _ops_for(inputs[0].dim() - 2)[2])

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, grad_output, weight_size, stride, padding, dilation, groups = _unpack(inputs)
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
            natural = _windows(input.shape[2:], grad.shape[2:], stride, padding, dilation)
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
            out = _sum(out, conv_weight(input, t_grad_output, ctx.weight_size, *ctx.args))
        return out


def _autograd_kernel(function, name):
    """The Autograd kernel of op `name`: `function` when derivatives are
    wanted (Note [Autograd and torch.func]), else straight below autograd."""
    op = getattr(ops, name).default

    def kernel(keyset, *args):
        # Derivatives for floating and complex inputs only, as torch has them
        # (an integer or bool im2col/col2im has none).
        differentiable = args[0].is_floating_point() or args[0].is_complex()
        if differentiable and torch._C.is_grad_enabled() and (torch._C._any_requires_grad(*args) or _forward_ad._current_level >= 0):
            if _transforms_active():
                raise RuntimeError(
                    f"torch.ops.convt_ext.{name} was called under a torch.func transform with inputs "
                    f"that need derivatives; call convt_ext.{name}() (the Python function) instead, "
                    f"which carries its derivatives to torch.func"
                )
            return _apply(function, args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    return kernel


# ---------------------------------------------------------------- vmap


def _fold(t, bdim, size):
    """t with its vmapped dimension first (expanded when it has none)."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)


def _fold_batch(op, size, x, bdim, *args):
    """op over the vmapped dimension folded into the batch (dimension 0)."""
    x = _fold(x, bdim, size)
    out = op(x.flatten(0, 1), *args)
    return out.unflatten(0, (size, -1)), 0


def _vmap_window_op(op, batched_dims):
    """The vmap rule of im2col or col2im; batched_dims(args): the number of
    dimensions of a batched input."""

    def rule(info, in_dims, input, *args):
        if input.dim() - (in_dims[0] is not None) == batched_dims(args):
            return _fold_batch(op, info.batch_size, input, in_dims[0], *args)
        # Unbatched: the vmapped dimension is the batch.
        return op(_fold(input, in_dims[0], info.batch_size), *args), 0

    return rule


def _channels_into_groups(t, bdim, size):
    """(N, C, ...) vmapped over B -> (N, B*C, ...): the vmapped copies side by
    side along the channels, each to be convolved by its own groups."""
    return _fold(t, bdim, size).movedim(0, 1).flatten(1, 2)


def _params_into_groups(t, bdim, size):
    """A weight (or bias) vmapped over B -> its B copies stacked along dimension 0."""
    return _fold(t, bdim, size).flatten(0, 1)


def _vmap_conv(info, in_dims, input, weight, bias, stride, padding, dilation, groups):
    op = _ops_for(len(stride))[0]
    bx, bw, bb = in_dims[:3]
    B = info.batch_size
    if bw is None and bb is None:
        return _fold_batch(op, B, input, bx, weight, bias, stride, padding, dilation, groups)
    # A vmapped weight: B convolutions side by side as B*groups groups.
    out = op(
        _channels_into_groups(input, bx, B),
        _params_into_groups(weight, bw, B),
        None if bias is None else _params_into_groups(bias, bb, B),
        stride,
        padding,
        dilation,
        groups * B,
    )
    return out.unflatten(1, (B, -1)), 1


def _vmap_conv_transpose(info, in_dims, input, weight, bias, stride, padding, output_padding, groups, dilation):
    op = _ops_for(len(stride))[1]
    bx, bw, bb = in_dims[:3]
    B = info.batch_size
    if bw is None and bb is None:
        return _fold_batch(op, B, input, bx, weight, bias, stride, padding, output_padding, groups, dilation)
    out = op(
        _channels_into_groups(input, bx, B),
        _params_into_groups(weight, bw, B),
        None if bias is None else _params_into_groups(bias, bb, B),
        stride,
        padding,
        output_padding,
        groups * B,
        dilation,
    )
    return out.unflatten(1, (B, -1)), 1


def _vmap_conv_weight(info, in_dims, input, grad_output, weight_size, stride, padding, dilation, groups):
    op = _ops_for(len(stride))[2]
    B = info.batch_size
    size = [B * weight_size[0], *weight_size[1:]]
    out = op(
        _channels_into_groups(input, in_dims[0], B),
        _channels_into_groups(grad_output, in_dims[1], B),
        size,
        stride,
        padding,
        dilation,
        groups * B,
    )
    return out.unflatten(0, (B, -1)), 0


# ---------------------------------------------------------------- registration

_lib = torch.library.Library("convt_ext", "IMPL")  # the Autograd kernels; kept for the process


def _register(name, fake, function, vmap):
    torch.library.register_fake(f"convt_ext::{name}")(fake)
    _lib.impl(name, _autograd_kernel(function, name), "Autograd", with_keyset=True)
    torch.library.register_vmap(f"convt_ext::{name}", vmap)


_register("im2col", _im2col_fake, _Im2col, _vmap_window_op(ops.im2col, lambda args: len(args[0]) + 2))
_register("col2im", _col2im_fake, _Col2im, _vmap_window_op(ops.col2im, lambda args: 3))
for _d in (1, 2, 3):
    _register(f"conv{_d}d", _conv_fake, _Conv, _vmap_conv)
    _register(f"conv_transpose{_d}d", _conv_transpose_fake, _ConvTranspose, _vmap_conv_transpose)
    _register(f"conv{_d}d_weight", _conv_weight_fake, _ConvWeight, _vmap_conv_weight)
