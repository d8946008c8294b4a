"""Fake (meta) kernels of the torch.ops.convt_ext ops: each result's shape,
dtype, device and memory format, computed without data, for torch.compile,
torch.export and FakeTensor. Importing this module registers them.

The shapes come from convt_ext._geometry (the formulas, written once); the
memory-format rule below is also the one the autograd layer gives gradients.
"""
import torch

from . import _C  # noqa: F401  (defines the ops)
from ._geometry import checked, prod, transposed_size, windows

# ---------------------------------------------------------------- memory format


def output_format(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """The memory format torch's own convolution gives its output (and
    gradients) for these arguments, asked of torch as its fake kernels do:
    Note [Memory format] in csrc/conv/args.cpp, which asks the same."""
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


def conv_format(input, weight, bias, stride, padding, dilation, groups):
    return output_format(input, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)


def conv_transpose_format(input, weight, bias, stride, padding, output_padding, groups, dilation):
    return output_format(input, weight, bias, stride, padding, dilation, True, output_padding, groups)


def conv_weight_format(input, weight_size, stride, padding, dilation, groups):
    """torch.nn.grad's: that of the convolution with a new, contiguous weight."""
    weight = torch.empty(tuple(weight_size), dtype=input.dtype, device=input.device)
    return conv_format(input, weight, None, stride, padding, dilation, groups)


# ---------------------------------------------------------------- fake kernels


def _empty(like, shape, memory_format=torch.contiguous_format):
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def im2col(input, kernel_size, dilation, padding, stride):
    d = len(kernel_size)
    positions = windows(input.shape[-d:], kernel_size, stride, padding, dilation, "im2col")
    shape = (input.shape[-d - 1] * prod(kernel_size), checked("im2col", "the window count", prod(positions)))
    return input.new_empty(input.shape[: -d - 1] + shape)


def col2im(input, output_size, kernel_size, dilation, padding, stride):
    channels = input.shape[-2] // prod(kernel_size)
    return input.new_empty(input.shape[:-2] + (channels,) + tuple(output_size))


def _check_out(op, out, like):
    """Fake kernels of the out= variants: the real op's shape rule on out."""
    if tuple(out.shape) != tuple(like.shape):
        raise ValueError(f"{op}: out must have shape {tuple(like.shape)}, but got {tuple(out.shape)}")


def im2col_out(input, kernel_size, dilation, padding, stride, *, out):
    _check_out("im2col", out, im2col(input, kernel_size, dilation, padding, stride))


def col2im_out(input, output_size, kernel_size, dilation, padding, stride, *, out):
    _check_out("col2im", out, col2im(input, output_size, kernel_size, dilation, padding, stride))


def conv(input, weight, bias, stride, padding, dilation, groups):
    positions = windows(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    fmt = conv_format(input, weight, bias, stride, padding, dilation, groups)
    return _empty(input, (input.shape[0], weight.shape[0], *positions), fmt)


def conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation):
    d = weight.dim() - 2
    size = [
        checked(
            "conv_transpose",
            "the output size",
            transposed_size(input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], output_padding[i], dilation[i]),
        )
        for i in range(d)
    ]
    fmt = conv_transpose_format(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return _empty(input, (input.shape[0], weight.shape[1] * groups, *size), fmt)


def conv_weight(input, grad_output, weight_size, stride, padding, dilation, groups):
    return _empty(input, tuple(weight_size), conv_weight_format(input, weight_size, stride, padding, dilation, groups))


def conv_transpose_backward(grad_output, input, weight, stride, padding, output_padding, groups, dilation):
    expected = conv_transpose(input, weight, None, stride, padding, output_padding, groups, dilation).shape
    if tuple(grad_output.shape) != tuple(expected):
        raise ValueError(
            f"_conv_transpose_backward: grad_output must have the output's shape {tuple(expected)}, "
            f"but got {tuple(grad_output.shape)}"
        )
    return _empty(input, input.shape), _empty(input, weight.shape)


# ---------------------------------------------------------------- registration

_FAKES = {
    "im2col": im2col,
    "im2col.out": im2col_out,
    "col2im": col2im,
    "col2im.out": col2im_out,
    "_conv_transpose_backward": conv_transpose_backward,
}
for _d in (1, 2, 3):
    _FAKES.update({f"conv{_d}d": conv, f"conv_transpose{_d}d": conv_transpose, f"conv{_d}d_weight": conv_weight})

for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"convt_ext::{_name}")(_fake)
