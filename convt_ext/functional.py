"""The public functions, with torch.nn.functional's names, arguments and order.

Each normalises its arguments (int or pair, string padding, unbatched input)
and calls one torch.ops.convt_ext op; the ops check the geometry and raise
ValueError/TypeError naming the argument that breaks a rule.
"""
import torch
import torch.nn.functional as F

from . import _ops

ops = torch.ops.convt_ext

__all__ = ["im2col", "col2im", "conv2d", "conv_transpose2d", "conv2d_weight"]

_INT = (int, torch.SymInt)


def _pair(value, name, op):
    """An int or a pair of ints, as a pair. bools and other types are rejected."""
    if isinstance(value, _INT) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2:
        if all(isinstance(v, _INT) and not isinstance(v, bool) for v in value):
            return tuple(value)
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, but got {name}={value!r}")


def _int(value, name, op):
    if isinstance(value, _INT) and not isinstance(value, bool):
        return value
    raise TypeError(f"{op}: {name} must be an int, but got {name}={value!r}")


def _check_tensor(value, name, op):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, but got {type(value).__name__}")


def im2col(input, kernel_size, dilation=1, padding=0, stride=1):
    """Extract sliding windows, exactly like ``F.unfold``.

    ``input`` is ``(N, C, H, W)`` or unbatched ``(C, H, W)``; the result is
    ``(N, C*kh*kw, L)`` (or ``(C*kh*kw, L)``), rows ordered (c, ki, kj) and L
    the number of window positions. Its backward is :func:`col2im`.
    """
    op = "im2col"
    _check_tensor(input, "input", op)
    return ops.im2col(
        input,
        _pair(kernel_size, "kernel_size", op),
        _pair(dilation, "dilation", op),
        _pair(padding, "padding", op),
        _pair(stride, "stride", op),
    )


def col2im(input, output_size, kernel_size, dilation=1, padding=0, stride=1):
    """Sum sliding windows back into an image, exactly like ``F.fold``: the
    adjoint (transpose) of :func:`im2col`, and its backward."""
    op = "col2im"
    _check_tensor(input, "input", op)
    return ops.col2im(
        input,
        _pair(output_size, "output_size", op),
        _pair(kernel_size, "kernel_size", op),
        _pair(dilation, "dilation", op),
        _pair(padding, "padding", op),
        _pair(stride, "stride", op),
    )


def _check_bias(bias, op):
    if bias is not None:
        _check_tensor(bias, "bias", op)


def _batched(input, op, name="input"):
    """(input as 4-d, whether it was unbatched)."""
    _check_tensor(input, name, op)
    if input.dim() == 3:
        return input.unsqueeze(0), True
    if input.dim() == 4:
        return input, False
    raise ValueError(f"{op}: {name} must be 3-d (C, H, W) or 4-d (N, C, H, W), but got a {input.dim()}-d tensor")


def _same_padding(input, kernel, dilation, op):
    """'same' padding: total d(k-1) per dimension, the odd pixel on the high
    side as in torch. Returns (input padded on the high side where needed,
    symmetric padding)."""
    total = [dilation[i] * (kernel[i] - 1) for i in range(2)]
    low = [t // 2 for t in total]
    extra = [total[i] - 2 * low[i] for i in range(2)]
    if any(extra):
        input = F.pad(input, (0, extra[1], 0, extra[0]))
    return input, tuple(low)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """A 2-d convolution (cross-correlation), exactly like ``F.conv2d``,
    computed as im2col followed by one GEMM per group.

    ``padding`` may be an int, a pair, ``'valid'`` or ``'same'``. Its input
    gradient is :func:`conv_transpose2d`.
    """
    op = "conv2d"
    x, unbatched = _batched(input, op)
    _check_tensor(weight, "weight", op)
    _check_bias(bias, op)
    stride = _pair(stride, "stride", op)
    dilation = _pair(dilation, "dilation", op)
    groups = _int(groups, "groups", op)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"{op}: padding='same' is not supported for strided convolutions, but got stride={stride}")
            if weight.dim() != 4:
                raise ValueError(f"{op}: weight must be 4-d, but got a {weight.dim()}-d tensor of shape {tuple(weight.shape)}")
            x, padding = _same_padding(x, weight.shape[2:], dilation, op)
        else:
            raise ValueError(f"{op}: padding must be an int, a pair of ints, 'valid' or 'same', but got padding={padding!r}")
    else:
        padding = _pair(padding, "padding", op)
    out = ops.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return out.squeeze(0) if unbatched else out


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """A 2-d transposed convolution, exactly like ``F.conv_transpose2d``
    (note: ``groups`` comes before ``dilation``), computed as one GEMM per
    group, ``W^T x``, followed by col2im.

    It is the adjoint of :func:`conv2d` with the same weight: C^T applied to
    its input. Its input gradient is :func:`conv2d`.
    """
    op = "conv_transpose2d"
    x, unbatched = _batched(input, op)
    _check_tensor(weight, "weight", op)
    _check_bias(bias, op)
    out = ops.conv_transpose2d(
        x,
        weight,
        bias,
        _pair(stride, "stride", op),
        _pair(padding, "padding", op),
        _pair(output_padding, "output_padding", op),
        _int(groups, "groups", op),
        _pair(dilation, "dilation", op),
    )
    return out.squeeze(0) if unbatched else out


def conv2d_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """The gradient of conv2d with respect to its weight, with the argument
    order of ``torch.nn.grad.conv2d_weight``."""
    op = "conv2d_weight"
    x, unbatched = _batched(input, op)
    dy, _ = _batched(grad_output, op, "grad_output")
    if not isinstance(weight_size, (tuple, list, torch.Size)):
        raise TypeError(f"{op}: weight_size must be a sequence of 4 ints, but got weight_size={weight_size!r}")
    return ops.conv2d_weight(
        x,
        dy,
        [_int(v, "weight_size", op) for v in weight_size],
        _pair(stride, "stride", op),
        _pair(padding, "padding", op),
        _pair(dilation, "dilation", op),
        _int(groups, "groups", op),
    )
