"""Fake (meta) kernels and autograd for the torch.ops.convt_ext ops.

The autograd formulas are the point of the library: every backward is another
convt_ext op, so double backward works and the duality is plain to see.

    op                 grad wrt its image input          grad wrt the other input
    im2col             col2im                            -
    col2im             im2col                            -
    conv2d             conv_transpose2d                  conv2d_weight
    conv_transpose2d   conv2d                            conv2d_weight (roles swapped)
    conv2d_weight      conv_transpose2d (wrt input)      conv2d (wrt grad_output)
"""
import torch
import torch.nn.functional as F

from . import _C  # noqa: F401  (loads the library that defines the ops)

ops = torch.ops.convt_ext


def window_count(size, kernel, stride, padding, dilation):
    """Window positions along one dimension: the guide's relationship 15
    (relationship 6 when dilation is 1). Mirrors csrc/im2col.h for fake
    tensors, where sizes may be symbolic."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def transposed_size(size, kernel, stride, padding, output_padding, dilation):
    """Output size of a transposed convolution: the guide's relationship 14,
    with dilation: o' = s(i'-1) + a + d(k-1) + 1 - 2p."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def output_padding_to_reach(size, target, kernel, stride, padding, dilation):
    """The output_padding a with which a transposed convolution of `size`
    window positions has `target` pixels (the inverse of transposed_size)."""
    return target - transposed_size(size, kernel, stride, padding, 0, dilation)


def _windows(shape, kernel_size, stride, padding, dilation):
    return [window_count(shape[i], kernel_size[i], stride[i], padding[i], dilation[i]) for i in range(2)]


# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake("convt_ext::im2col")
def _im2col_fake(input, kernel_size, dilation, padding, stride):
    oh, ow = _windows(input.shape[-2:], kernel_size, stride, padding, dilation)
    shape = (input.shape[-3] * kernel_size[0] * kernel_size[1], oh * ow)
    return input.new_empty(input.shape[:-3] + shape)


@torch.library.register_fake("convt_ext::col2im")
def _col2im_fake(input, output_size, kernel_size, dilation, padding, stride):
    channels = input.shape[-2] // (kernel_size[0] * kernel_size[1])
    return input.new_empty(input.shape[:-2] + (channels, output_size[0], output_size[1]))


@torch.library.register_fake("convt_ext::conv2d")
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups):
    oh, ow = _windows(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    return input.new_empty((input.shape[0], weight.shape[0], oh, ow))


@torch.library.register_fake("convt_ext::conv_transpose2d")
def _conv_transpose2d_fake(input, weight, bias, stride, padding, output_padding, groups, dilation):
    size = [
        transposed_size(input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], output_padding[i], dilation[i])
        for i in range(2)
    ]
    return input.new_empty((input.shape[0], weight.shape[1] * groups, size[0], size[1]))


@torch.library.register_fake("convt_ext::conv2d_weight")
def _conv2d_weight_fake(input, grad_output, weight_size, stride, padding, dilation, groups):
    return input.new_empty(tuple(weight_size))


# ---------------------------------------------------------------- autograd


def _im2col_setup(ctx, inputs, output):
    input, kernel_size, dilation, padding, stride = inputs
    ctx.image_size = input.shape[-2:]
    ctx.args = (kernel_size, dilation, padding, stride)


def _im2col_backward(ctx, grad):
    # <im2col(x), g> = <x, col2im(g)>: the adjoint of im2col is col2im.
    return ops.col2im(grad, ctx.image_size, *ctx.args), None, None, None, None


def _col2im_setup(ctx, inputs, output):
    ctx.args = inputs[2:]


def _col2im_backward(ctx, grad):
    return ops.im2col(grad, *ctx.args), None, None, None, None, None


def _conv2d_setup(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.args = (stride, padding, dilation, groups)


def _conv2d_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.args
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        # The input gradient is C^T applied to the upstream gradient: a transposed
        # convolution, with the output_padding that brings the size back to the input's.
        output_padding = [
            output_padding_to_reach(grad.shape[2 + i], input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
            for i in range(2)
        ]
        grad_input = ops.conv_transpose2d(grad, weight, None, stride, padding, output_padding, groups, dilation)
    if ctx.needs_input_grad[1]:
        grad_weight = ops.conv2d_weight(input, grad, weight.shape, stride, padding, dilation, groups)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias, None, None, None, None


def _crop_to(t, like):
    """t[..., :H, :W] with like's H, W. A transposed convolution with
    output_padding >= stride owns fewer windows than its output image has
    (see csrc/im2col.h), so the natural size of its adjoint can overshoot."""
    return t[..., : like.shape[-2], : like.shape[-1]]


def _conv_transpose2d_setup(ctx, inputs, output):
    input, weight, bias, stride, padding, output_padding, groups, dilation = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.args = (stride, padding, dilation, groups)


def _conv_transpose2d_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.args
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        # The adjoint of a transposed convolution is the direct one.
        grad_input = _crop_to(ops.conv2d(grad, weight, None, stride, padding, dilation, groups), input)
    if ctx.needs_input_grad[1]:
        grad_weight = ops.conv2d_weight(grad, input, weight.shape, stride, padding, dilation, groups)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _conv2d_weight_setup(ctx, inputs, output):
    input, grad_output, weight_size, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, grad_output)
    ctx.args = (stride, padding, dilation, groups)


def _conv2d_weight_backward(ctx, grad):
    # conv2d_weight(x, dy) is bilinear: <G, conv2d_weight(x, dy)> = <conv2d(x, G), dy>
    # = <x, conv_transpose2d(dy, G)>.
    input, grad_output = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.args
    grad_input = grad_grad_output = None
    if ctx.needs_input_grad[0]:
        # dy may cover fewer windows than x has (the weight gradient of a transposed
        # convolution with output_padding >= stride). The missing windows contribute
        # nothing, so give them zeros: then the output_padding that restores x's size
        # is the natural one, below the stride.
        natural = _windows(input.shape[2:], grad.shape[2:], stride, padding, dilation)
        short = [natural[i] - grad_output.shape[2 + i] for i in range(2)]
        dy = F.pad(grad_output, (0, short[1], 0, short[0])) if any(short) else grad_output
        output_padding = [
            output_padding_to_reach(natural[i], input.shape[2 + i], grad.shape[2 + i], stride[i], padding[i], dilation[i])
            for i in range(2)
        ]
        grad_input = ops.conv_transpose2d(dy, grad, None, stride, padding, output_padding, groups, dilation)
    if ctx.needs_input_grad[1]:
        grad_grad_output = _crop_to(ops.conv2d(input, grad, None, stride, padding, dilation, groups), grad_output)
    return grad_input, grad_grad_output, None, None, None, None, None


torch.library.register_autograd("convt_ext::im2col", _im2col_backward, setup_context=_im2col_setup)
torch.library.register_autograd("convt_ext::col2im", _col2im_backward, setup_context=_col2im_setup)
torch.library.register_autograd("convt_ext::conv2d", _conv2d_backward, setup_context=_conv2d_setup)
torch.library.register_autograd(
    "convt_ext::conv_transpose2d", _conv_transpose2d_backward, setup_context=_conv_transpose2d_setup
)
torch.library.register_autograd(
    "convt_ext::conv2d_weight", _conv2d_weight_backward, setup_context=_conv2d_weight_setup
)
