"""Fake (meta) kernels and autograd for the torch.ops.convt_ext ops.

The autograd formulas are the point of the library: every backward is another
convt_ext op, so double backward works and the duality is plain to see.

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


INT64_MAX = 2**63 - 1


def _checked(op, what, value):
    """A size computed by a fake kernel, refused when it would not fit in
    int64 (plain ints only: Python's do not wrap, so the check is exact;
    symbolic sizes are checked by the real kernel)."""
    if isinstance(value, int) and value > INT64_MAX:
        raise ValueError(f"{op}: {what} overflows int64 ({value})")
    return value


def _windows(shape, kernel_size, stride, padding, dilation, op="convt_ext"):
    return [
        _checked(op, "the window count", window_count(shape[i], kernel_size[i], stride[i], padding[i], dilation[i]))
        for i in range(len(kernel_size))
    ]


def _prod(values):
    out = 1
    for v in values:
        out = out * v
    return out


def _spatial_dims_of_grad(grad):
    return tuple(range(2, grad.dim()))


# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake("convt_ext::im2col")
def _im2col_fake(input, kernel_size, dilation, padding, stride):
    d = len(kernel_size)
    windows = _windows(input.shape[-d:], kernel_size, stride, padding, dilation, "im2col")
    shape = (input.shape[-d - 1] * _prod(kernel_size), _checked("im2col", "the window count", _prod(windows)))
    return input.new_empty(input.shape[: -d - 1] + shape)


@torch.library.register_fake("convt_ext::col2im")
def _col2im_fake(input, output_size, kernel_size, dilation, padding, stride):
    channels = input.shape[-2] // _prod(kernel_size)
    return input.new_empty(input.shape[:-2] + (channels,) + tuple(output_size))


def _conv_fake(input, weight, bias, stride, padding, dilation, groups):
    windows = _windows(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    return input.new_empty((input.shape[0], weight.shape[0], *windows))


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
    return input.new_empty((input.shape[0], weight.shape[1] * groups, *size))


def _conv_weight_fake(input, grad_output, weight_size, stride, padding, dilation, groups):
    return input.new_empty(tuple(weight_size))


# ---------------------------------------------------------------- autograd


def _im2col_setup(ctx, inputs, output):
    input, kernel_size, dilation, padding, stride = inputs
    ctx.image_size = input.shape[-len(kernel_size) :]
    ctx.args = (kernel_size, dilation, padding, stride)


def _im2col_backward(ctx, grad):
    # <im2col(x), g> = <x, col2im(g)>: the adjoint of im2col is col2im.
    return ops.col2im(grad, ctx.image_size, *ctx.args), None, None, None, None


def _col2im_setup(ctx, inputs, output):
    ctx.args = inputs[2:]


def _col2im_backward(ctx, grad):
    return ops.im2col(grad, *ctx.args), None, None, None, None, None


def _ops_for(d):
    """The dispatcher ops of one dimension: (conv, conv_transpose, conv_weight)."""
    return (
        getattr(ops, f"conv{d}d"),
        getattr(ops, f"conv_transpose{d}d"),
        getattr(ops, f"conv{d}d_weight"),
    )


def _conv_setup(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.args = (stride, padding, dilation, groups)


def _conv_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.args
    d = weight.dim() - 2
    _, conv_transpose, conv_weight = _ops_for(d)
    grad_input = grad_weight = grad_bias = None
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
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad.sum((0,) + _spatial_dims_of_grad(grad))
    return grad_input, grad_weight, grad_bias, None, None, None, None


def _crop_to(t, like):
    """t cropped to like's spatial size. A transposed convolution with
    output_padding >= stride owns fewer windows than its output image has
    (see csrc/im2col.h), so the natural size of its adjoint can overshoot."""
    return t[(Ellipsis,) + tuple(slice(0, n) for n in like.shape[2:])]


def _conv_transpose_setup(ctx, inputs, output):
    input, weight, bias, stride, padding, output_padding, groups, dilation = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.args = (stride, padding, dilation, groups)


def _conv_transpose_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.args
    conv, _, conv_weight = _ops_for(weight.dim() - 2)
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        # The adjoint of a transposed convolution is the direct one.
        grad_input = _crop_to(conv(grad, weight, None, stride, padding, dilation, groups), input)
    if ctx.needs_input_grad[1]:
        grad_weight = conv_weight(grad, input, weight.shape, stride, padding, dilation, groups)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad.sum((0,) + _spatial_dims_of_grad(grad))
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _conv_weight_setup(ctx, inputs, output):
    input, grad_output, weight_size, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, grad_output)
    ctx.args = (stride, padding, dilation, groups)


def _conv_weight_backward(ctx, grad):
    # conv_weight(x, dy) is bilinear: <G, conv_weight(x, dy)> = <conv(x, G), dy>
    # = <x, conv_transpose(dy, G)>.
    input, grad_output = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.args
    d = grad.dim() - 2
    conv, conv_transpose, _ = _ops_for(d)
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
    return grad_input, grad_grad_output, None, None, None, None, None


torch.library.register_autograd("convt_ext::im2col", _im2col_backward, setup_context=_im2col_setup)
torch.library.register_autograd("convt_ext::col2im", _col2im_backward, setup_context=_col2im_setup)
for _d in (1, 2, 3):
    torch.library.register_fake(f"convt_ext::conv{_d}d")(_conv_fake)
    torch.library.register_fake(f"convt_ext::conv_transpose{_d}d")(_conv_transpose_fake)
    torch.library.register_fake(f"convt_ext::conv{_d}d_weight")(_conv_weight_fake)
    torch.library.register_autograd(f"convt_ext::conv{_d}d", _conv_backward, setup_context=_conv_setup)
    torch.library.register_autograd(
        f"convt_ext::conv_transpose{_d}d", _conv_transpose_backward, setup_context=_conv_transpose_setup
    )
    torch.library.register_autograd(f"convt_ext::conv{_d}d_weight", _conv_weight_backward, setup_context=_conv_weight_setup)
