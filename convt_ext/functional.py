"""The public functions, with torch.nn.functional's names, arguments and order,
in 1, 2 and 3 spatial dimensions.

Each normalises its arguments (int or tuple, string padding, unbatched input)
and calls one torch.ops.convt_ext op (through convt_ext._autograd, which
carries its derivatives to torch.func); the ops check the geometry and raise
ValueError/TypeError naming the argument that breaks a rule. conv and
conv_transpose first offer the call as written to a C++ entry, which takes it
where these checks would pass it unchanged (Note [The fast entry] in
csrc/calls.cpp): on a small tensor the checks cost as much as the op.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _autograd
from . import _C
from ._geometry import INT64_MAX, default_window_dims, dilated_extent

ops = torch.ops.convt_ext

__all__ = [
    "im2col",
    "im2col_view",
    "col2im",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "conv1d_weight",
    "conv2d_weight",
    "conv3d_weight",
]

_INT = (int, torch.SymInt)
_SEQUENCE = (tuple, list, torch.Size)


def _is_int(value):
    return isinstance(value, _INT) and not isinstance(value, bool)


def _fits_int64(value, name, op):
    """A plain int must fit in int64, the ops' integer type."""
    if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise ValueError(f"{op}: {name}={value} does not fit in int64")
    return value


def _ntuple(value, n, name, op):
    """An int, or a sequence of n ints, as a tuple of n ints; anything else
    (bools, other types, a sequence of another length) is a TypeError."""
    if _is_int(value):
        return (_fits_int64(value, name, op),) * n
    if isinstance(value, _SEQUENCE) and len(value) == n and all(_is_int(v) for v in value):
        return tuple(_fits_int64(v, name, op) for v in value)
    what = "a pair of ints" if n == 2 else f"a sequence of {n} ints (one per spatial dimension)"
    raise TypeError(f"{op}: {name} must be an int or {what}, but got {name}={value!r}")


def _pair(value, name, op):
    return _ntuple(value, 2, name, op)


def _int(value, name, op):
    if _is_int(value):
        return _fits_int64(value, name, op)
    raise TypeError(f"{op}: {name} must be an int, but got {name}={value!r}")


def _check_tensor(value, name, op):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, but got {type(value).__name__}")


def _dims_of(op, named, default):
    """The number of spatial dimensions: the length of the sequence arguments
    in `named` (name -> value), which must agree, else `default`."""
    dims = None
    for name, value in named.items():
        if isinstance(value, _SEQUENCE):
            if dims is None:
                dims, first = len(value), name
            elif len(value) != dims:
                raise ValueError(
                    f"{op}: {name} has {len(value)} values but {first} has {dims}: every geometry "
                    f"argument needs one value per spatial dimension, but got {name}={value!r}, {first}={named[first]!r}"
                )
    dims = default if dims is None else dims
    if dims not in (1, 2, 3):
        raise ValueError(f"{op}: 1, 2 or 3 spatial dimensions are supported, but the arguments give {dims} ({named})")
    return dims


def _window_op(op, input, args, out):
    """im2col or col2im (`op`), into `out` when one is given."""
    if out is None:
        return getattr(_autograd, op)(input, *args)
    _check_tensor(out, "out", op)
    getattr(ops, op).out(input, *args, out=out)
    return out


def im2col(input, kernel_size, dilation=1, padding=0, stride=1, *, out=None):
    """Extract sliding windows, like ``F.unfold``, in 1, 2 or 3 dimensions.

    ``input`` is ``(N, C, *spatial)`` or unbatched ``(C, *spatial)``; the
    result is ``(N, C*prod(kernel_size), L)`` (or without N), rows ordered
    (c, kernel offset), L the number of window positions, both row-major.
    The number of spatial dimensions D is the length of any tuple argument;
    with ints only it is 2 for a 3-d or 4-d input (as ``F.unfold``), 3 for
    a 5-d and 1 for a 2-d input. Its backward is :func:`col2im`.

    ``out``: a tensor of the result's exact shape, dtype and device (any
    strides) to write into and return, so that a loop reuses one column
    buffer; like torch's out= functions it has no gradient.
    """
    op = "im2col"
    _check_tensor(input, "input", op)
    named = dict(kernel_size=kernel_size, dilation=dilation, padding=padding, stride=stride)
    d = _image_dims(op, input, named)
    return _window_op(op, input, [_ntuple(v, d, k, op) for k, v in named.items()], out)


def _image_dims(op, input, named):
    """D for an image op (im2col, im2col_view): from any sequence in `named`,
    else from the input's dimensions (default_window_dims)."""
    default = default_window_dims(op, input.dim())
    if default == 0:
        raise ValueError(f"{op}: input must be 2-d to 5-d, (C, L) to (N, C, D, H, W), but got a {input.dim()}-d tensor")
    return _dims_of(op, named, default)


def im2col_view(input, kernel_size, dilation=1, stride=1):
    """The sliding windows of ``input`` as a view, copying nothing: NumPy's
    ``sliding_window_view`` with stride and dilation, in 1, 2 or 3 dimensions
    and any dtype.

    ``input`` is ``(N, C, *spatial)`` or unbatched ``(C, *spatial)``, D taken
    as in :func:`im2col`. The result is ``(N, C, *kernel_size, *windows)``
    (or without N), where ``view[n, c, k, o] = input[n, c, o*stride +
    k*dilation]`` per dimension: the relation of :func:`im2col` with no
    padding, as strides (``dilation * input.stride()`` for the kernel
    offsets, ``stride * input.stride()`` for the windows). It shares
    ``input``'s memory, so writing into either changes both, and many of its
    elements alias each other where windows overlap (write to a clone).
    Without padding::

        im2col(x, k, d, 0, s) == im2col_view(x, k, d, s).reshape(N, C * prod(k), L)

    Padding would need a copy; pad first::

        v = im2col_view(F.pad(x, (1, 1, 1, 1)), 3)  # im2col(x, 3, padding=1), as a view of the padded x

    A consumer that reads the view directly copies nothing at all, e.g. a
    convolution (``F.conv2d(x, w, stride=s, dilation=d)``) as one einsum::

        y = torch.einsum("ncklhw,ockl->nohw", im2col_view(x, w.shape[2:], d, s), w)

    Built from ``Tensor.unfold`` (no ``as_strided``), so it works under
    ``torch.func.vmap`` and ``torch.compile``, and autograd flows through it.
    """
    op = "im2col_view"
    _check_tensor(input, "input", op)
    named = dict(kernel_size=kernel_size, dilation=dilation, stride=stride)
    d = _image_dims(op, input, named)
    kernel_size, dilation, stride = (_ntuple(v, d, k, op) for k, v in named.items())
    for name, values in (("kernel_size", kernel_size), ("dilation", dilation), ("stride", stride)):
        if any(v < 1 for v in values):
            raise ValueError(f"{op}: {name} must be positive, but got {name}={values}")
    if input.dim() not in (d + 1, d + 2):
        raise ValueError(
            f"{op}: input must be {d + 1}-d (C, *spatial) or {d + 2}-d (N, C, *spatial) for {d} spatial "
            f"dimensions (the length of kernel_size={kernel_size}), but got a {input.dim()}-d tensor"
        )
    first = input.dim() - d  # the first spatial dimension
    if any(n == 0 for n in input.shape[first - 1 :]):
        raise ValueError(
            f"{op}: input must have non-zero channels and spatial sizes (only the batch may be empty), "
            f"but got shape {tuple(input.shape)}"
        )
    spans = [dilated_extent(kernel_size[i], dilation[i]) for i in range(d)]
    if any(spans[i] > input.shape[first + i] for i in range(d)):
        raise ValueError(
            f"{op}: input of spatial size {tuple(input.shape[first:])} is too small for kernel_size={kernel_size} "
            f"with dilation={dilation}: each size must be at least dilation*(kernel_size-1)+1 (pad it first, with F.pad)"
        )
    view = input
    for i in range(d):
        # Windows of the dilated span, `stride` apart, in a new last dimension;
        # every dilation-th element of a span is a tap.
        view = view.unfold(first + i, spans[i], stride[i])
        if dilation[i] > 1:
            view = view[..., :: dilation[i]]
    # (..., C, *windows, *kernel) -> (..., C, *kernel, *windows)
    lead = tuple(range(first))
    return view.permute(*lead, *range(first + d, first + 2 * d), *range(first, first + d))


def col2im(input, output_size, kernel_size, dilation=1, padding=0, stride=1, *, out=None):
    """Sum sliding windows back into an image, like ``F.fold``, in 1, 2 or 3
    dimensions: the adjoint (transpose) of :func:`im2col`, and its backward.
    D is the length of ``output_size`` (or of any tuple argument; 2 with ints
    only). ``out`` as in :func:`im2col`."""
    op = "col2im"
    _check_tensor(input, "input", op)
    named = dict(output_size=output_size, kernel_size=kernel_size, dilation=dilation, padding=padding, stride=stride)
    d = _dims_of(op, named, default_window_dims(op, input.dim()))
    return _window_op(op, input, [_ntuple(v, d, k, op) for k, v in named.items()], out)


def _check_bias(bias, op):
    if bias is not None:
        _check_tensor(bias, "bias", op)


def _as_batch(input: Tensor, d: int) -> Tuple[Tensor, bool]:
    """(input with a batch dimension, whether it had none): like torch's, the
    convolutions take one unbatched sample, (C, *spatial), as a batch of one;
    _unbatch() takes the batch dimension off the result again. TorchScript
    compiles both for convt_ext.nn's scripted forwards."""
    if input.dim() == d + 1:
        return input.unsqueeze(0), True
    return input, False


def _unbatch(output: Tensor, unbatched: bool) -> Tensor:
    return output.squeeze(0) if unbatched else output


def _batched(input, d, op, name="input"):
    """_as_batch(input, d), for an input of d spatial dimensions, batched or not."""
    _check_tensor(input, name, op)
    if input.dim() not in (d + 1, d + 2):
        raise ValueError(f"{op}: {name} must be {d + 1}-d (C, *spatial) or {d + 2}-d (N, C, *spatial), but got a {input.dim()}-d tensor")
    return _as_batch(input, d)


def _same_padding(input, kernel, dilation, op):
    """'same' padding: total d(k-1) per dimension, the odd pixel on the high
    side as in torch. Returns (input padded on the high side where needed,
    symmetric padding)."""
    total = [dilated_extent(kernel[i], dilation[i]) - 1 for i in range(len(kernel))]
    size = input.shape[-len(kernel):]
    if any(isinstance(size[i], int) and size[i] + total[i] > INT64_MAX for i in range(len(kernel))):
        # The padding is derived from dilation: say so, not padding=<a number the caller never wrote>.
        raise ValueError(
            f"{op}: padding='same' with dilation={tuple(dilation)} and kernel size {tuple(kernel)} is too large: "
            "the padded input would overflow int64"
        )
    low = [t // 2 for t in total]
    extra = [total[i] - 2 * low[i] for i in range(len(kernel))]
    if any(extra):
        input = F.pad(input, [p for e in reversed(extra) for p in (0, e)])
    return input, tuple(low)


_compiling = torch.compiler.is_compiling


def _conv(d, input, weight, bias, stride, padding, dilation, groups):
    if not _compiling():
        out = _C._fast_conv(d, input, weight, bias, stride, padding, dilation, groups)
        if out is not None:
            return out
    op = f"conv{d}d"
    x, unbatched = _batched(input, d, op)
    _check_tensor(weight, "weight", op)
    _check_bias(bias, op)
    stride = _ntuple(stride, d, "stride", op)
    dilation = _ntuple(dilation, d, "dilation", op)
    groups = _int(groups, "groups", op)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * d
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"{op}: padding='same' is not supported for strided convolutions, but got stride={stride}")
            if weight.dim() != d + 2:
                raise ValueError(f"{op}: weight must be {d + 2}-d, but got a {weight.dim()}-d tensor of shape {tuple(weight.shape)}")
            x, padding = _same_padding(x, weight.shape[2:], dilation, op)
        else:
            raise ValueError(f"{op}: padding must be an int, a tuple of {d} ints, 'valid' or 'same', but got padding={padding!r}")
    else:
        padding = _ntuple(padding, d, "padding", op)
    return _unbatch(_autograd.conv(x, weight, bias, stride, padding, dilation, groups), unbatched)


def _conv_transpose(d, input, weight, bias, stride, padding, output_padding, groups, dilation):
    if not _compiling():
        out = _C._fast_conv_transpose(d, input, weight, bias, stride, padding, output_padding, groups, dilation)
        if out is not None:
            return out
    op = f"conv_transpose{d}d"
    x, unbatched = _batched(input, d, op)
    _check_tensor(weight, "weight", op)
    _check_bias(bias, op)
    out = _autograd.conv_transpose(
        x,
        weight,
        bias,
        _ntuple(stride, d, "stride", op),
        _ntuple(padding, d, "padding", op),
        _ntuple(output_padding, d, "output_padding", op),
        _int(groups, "groups", op),
        _ntuple(dilation, d, "dilation", op),
    )
    return _unbatch(out, unbatched)


def _conv_weight(d, input, weight_size, grad_output, stride, padding, dilation, groups):
    op = f"conv{d}d_weight"
    x, _ = _batched(input, d, op)
    dy, _ = _batched(grad_output, d, op, "grad_output")
    if not isinstance(weight_size, _SEQUENCE):
        raise TypeError(f"{op}: weight_size must be a sequence of {d + 2} ints, but got weight_size={weight_size!r}")
    return _autograd.conv_weight(
        x,
        dy,
        [_int(v, "weight_size", op) for v in weight_size],
        _ntuple(stride, d, "stride", op),
        _ntuple(padding, d, "padding", op),
        _ntuple(dilation, d, "dilation", op),
        _int(groups, "groups", op),
    )


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """A 1-d convolution, exactly like ``F.conv1d`` (see :func:`conv2d`)."""
    return _conv(1, input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """A 2-d convolution (cross-correlation), exactly like ``F.conv2d``,
    computed as im2col followed by one GEMM per group.

    ``padding`` may be an int, a pair, ``'valid'`` or ``'same'``. Its input
    gradient is :func:`conv_transpose2d`.
    """
    return _conv(2, input, weight, bias, stride, padding, dilation, groups)


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """A 3-d convolution, exactly like ``F.conv3d`` (see :func:`conv2d`)."""
    return _conv(3, input, weight, bias, stride, padding, dilation, groups)


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """A 1-d transposed convolution, exactly like ``F.conv_transpose1d``
    (see :func:`conv_transpose2d`)."""
    return _conv_transpose(1, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """A 2-d transposed convolution, exactly like ``F.conv_transpose2d``
    (note: ``groups`` comes before ``dilation``), computed as one GEMM per
    group, ``W^T x``, followed by col2im.

    It is the adjoint of :func:`conv2d` with the same weight: C^T applied to
    its input. Its input gradient is :func:`conv2d`.
    """
    return _conv_transpose(2, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """A 3-d transposed convolution, exactly like ``F.conv_transpose3d``
    (see :func:`conv_transpose2d`)."""
    return _conv_transpose(3, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv1d_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """The gradient of conv1d with respect to its weight, with the argument
    order of ``torch.nn.grad.conv1d_weight``."""
    return _conv_weight(1, input, weight_size, grad_output, stride, padding, dilation, groups)


def conv2d_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """The gradient of conv2d with respect to its weight, with the argument
    order of ``torch.nn.grad.conv2d_weight``."""
    return _conv_weight(2, input, weight_size, grad_output, stride, padding, dilation, groups)


def conv3d_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1, groups=1):
    """The gradient of conv3d with respect to its weight, with the argument
    order of ``torch.nn.grad.conv3d_weight``."""
    return _conv_weight(3, input, weight_size, grad_output, stride, padding, dilation, groups)
