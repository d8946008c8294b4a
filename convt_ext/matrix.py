"""Explicit relationships: convolution as a matrix, and the transposed
convolution as a direct one.

Sections 4.1-4.3 and 5 of Dumoulin & Visin, "A guide to convolution arithmetic
for deep learning", in code:

- :func:`im2col_matrix` is the one-channel selection matrix ``U`` of im2col;
  col2im is ``U^T``.
- :func:`conv_matrix` is the sparse matrix ``C`` of a convolution; the
  transposed convolution is ``C^T`` (its adjoint, not its inverse).
- :func:`equivalent_conv2d` gives the direct convolution that a transposed
  convolution equals (the guide's relationships 8-14, with dilation and
  groups); :func:`conv_transpose2d_as_conv2d` runs it.
- :func:`output_padding_for` picks the ``output_padding`` that gives a wanted
  output size.

Every size formula comes from :mod:`convt_ext._ops` and every index from the
C++ header ``csrc/im2col.h`` (through ``torch.ops.convt_ext.im2col_indices``);
nothing here derives them a second time. See ``docs/relationships.md``.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from . import _ops
from .functional import _check_tensor, _int, _pair, conv2d

__all__ = [
    "EquivalentConv2d",
    "conv_matrix",
    "conv_transpose2d_as_conv2d",
    "equivalent_conv2d",
    "im2col_matrix",
    "output_padding_for",
]

ops = torch.ops.convt_ext

Pair = Tuple[int, int]


# ---------------------------------------------------------------- matrices


def im2col_matrix(input_size, kernel_size, dilation=1, padding=0, stride=1, *, dtype=torch.float64, device=None):
    """The im2col selection matrix ``U`` of one channel, as a coalesced
    ``torch.sparse_coo`` tensor of shape ``(kh*kw*L, H*W)``.

    ``U[(ki*kw + kj)*L + l, ih*W + iw] = 1`` where window position ``l`` taps
    pixel ``(ih, iw)`` at kernel offset ``(ki, kj)``; taps into the padding
    have no entry. For a one-channel image ``x`` of size ``input_size`` and
    a column matrix ``c``::

        im2col(x).flatten() == U @ x.flatten()
        col2im(c, input_size, ...).flatten() == U.t() @ c.flatten()

    The entries come from the C++ index header that the kernels use.
    """
    op = "im2col_matrix"
    input_size = _pair(input_size, "input_size", op)
    kernel_size = _pair(kernel_size, "kernel_size", op)
    dilation = _pair(dilation, "dilation", op)
    padding = _pair(padding, "padding", op)
    stride = _pair(stride, "stride", op)
    indices = ops.im2col_indices(input_size, kernel_size, dilation, padding, stride)
    windows = _ops._windows(input_size, kernel_size, stride, padding, dilation)
    shape = (kernel_size[0] * kernel_size[1] * windows[0] * windows[1], input_size[0] * input_size[1])
    indices = indices.to(device) if device is not None else indices
    values = torch.ones(indices.shape[1], dtype=dtype, device=indices.device)
    # im2col_indices emits one entry per row, rows in increasing order.
    return torch.sparse_coo_tensor(indices, values, shape, is_coalesced=True, check_invariants=False)


def conv_matrix(weight, input_size, stride=1, padding=0, dilation=1, groups=1):
    """The matrix ``C`` of a 2-d convolution, as a coalesced
    ``torch.sparse_coo`` tensor of shape ``(C_out*OH*OW, C_in*H*W)`` with
    ``weight``'s dtype and device.

    For ``x`` of shape ``(C_in, H, W)`` and ``y`` of shape ``(C_out, OH, OW)``::

        conv2d(x[None], weight, None, stride, padding, dilation, groups).flatten() == C @ x.flatten()
        conv_transpose2d(y[None], weight, None, stride, padding, a, groups, dilation).flatten() == C.t() @ y.flatten()

    with ``a = (H + 2p - d(k-1) - 1) mod s`` per dimension.

    ``C`` is the one-channel im2col matrix ``U`` (:func:`im2col_matrix`)
    with each entry ``U[(k_off, l), pixel]`` replaced by the weight
    ``weight[o, c, k_off]`` for every (out channel ``o``, in channel ``c``)
    of a group: ``C[(o, l), (c, pixel)] = weight[o, c - g*C_in/groups, k_off]``.
    Differentiable in ``weight``.
    """
    op = "conv_matrix"
    _check_tensor(weight, "weight", op)
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be 4-d (C_out, C_in/groups, kh, kw), but got shape {tuple(weight.shape)}")
    input_size = _pair(input_size, "input_size", op)
    stride = _pair(stride, "stride", op)
    padding = _pair(padding, "padding", op)
    dilation = _pair(dilation, "dilation", op)
    groups = _int(groups, "groups", op)
    c_out, c_in_group, kh, kw = weight.shape
    if groups < 1 or c_out % groups:
        raise ValueError(f"{op}: groups must be positive and divide weight.shape[0]={c_out}, but got groups={groups}")
    indices = ops.im2col_indices(input_size, (kh, kw), dilation, padding, stride).to(weight.device)
    oh, ow = _ops._windows(input_size, (kh, kw), stride, padding, dilation)
    L, HW = oh * ow, input_size[0] * input_size[1]
    k_off, l = indices[0] // L, indices[0] % L  # U's row = k_off*L + l
    pixel = indices[1]

    o = torch.arange(c_out, device=weight.device)
    ci = torch.arange(c_in_group, device=weight.device)
    c = (o // (c_out // groups))[:, None] * c_in_group + ci[None, :]  # (C_out, C_in/g): absolute in channel
    rows = (o[:, None, None] * L + l).expand(c_out, c_in_group, -1)
    cols = c[:, :, None] * HW + pixel
    values = weight.reshape(c_out, c_in_group, kh * kw)[:, :, k_off]  # (C_out, C_in/g, nnz)
    shape = (c_out * L, c_in_group * groups * HW)
    C = torch.sparse_coo_tensor(
        torch.stack([rows.reshape(-1), cols.reshape(-1)]), values.reshape(-1), shape, check_invariants=False
    )
    return C.coalesce()


# ---------------------------------------------------------------- transposed as direct


@dataclass(frozen=True, eq=False)
class EquivalentConv2d:
    """The direct convolution that a transposed convolution equals.

    The guide's relationship 14 (8-13 are its special cases), extended to
    dilation ``d`` and groups: ``conv_transpose2d(x, w, stride=s, padding=p,
    output_padding=a, groups=g, dilation=d)`` is a stride-1 ``conv2d`` of
    the input after

    1. ``zero_insertion = s-1`` zeros between neighbouring pixels (size
       ``stretched_size = (i'-1)s + 1``, the guide's ``ĩ'``);
    2. ``padding_low = d(k-1) - p`` zeros before and ``padding_high =
       d(k-1) - p + a`` after (negative: crop that many pixels), the guide's
       ``p' = k - p - 1`` when d = 1, with its ``a`` extra pixels on the
       bottom/right;

    with ``weight`` (``(C_out, C_in/groups, kh, kw)``: the transposed
    convolution's ``(C_in, C_out/groups, kh, kw)`` kernel rotated 180° and
    with in/out channels swapped within each group), ``dilation`` d,
    ``groups`` g, stride 1. Every field is per dimension (height, width)
    except ``weight`` and ``groups``. ``output_size`` is ``o' = s(i'-1) + a
    + d(k-1) + 1 - 2p`` (relationship 14 with dilation).

    Instances compare by identity (``weight`` is a tensor).
    """

    input_size: Pair
    zero_insertion: Pair
    stretched_size: Pair
    padding_low: Pair
    padding_high: Pair
    weight: torch.Tensor
    dilation: Pair
    groups: int
    output_size: Pair

    def __repr__(self):
        fields = ", ".join(
            f"{name}={tuple(getattr(self, name).shape) if name == 'weight' else getattr(self, name)}"
            for name in self.__dataclass_fields__
        )
        return f"EquivalentConv2d({fields})"

    @property
    def padded_size(self):
        """The size of the stretched, padded input the stride-1 conv reads."""
        return tuple(self.stretched_size[i] + self.padding_low[i] + self.padding_high[i] for i in range(2))

    def stretch(self, input):
        """Step 1: insert ``zero_insertion`` zeros between the pixels of
        ``input`` (..., H, W). Differentiable."""
        out = input
        for dim, zeros in zip((-2, -1), self.zero_insertion):
            if zeros == 0:
                continue
            shape = list(out.shape)
            shape[dim] = (out.shape[dim] - 1) * (zeros + 1) + 1
            stretched = out.new_zeros(shape)
            index = [slice(None)] * out.dim()
            index[dim] = slice(None, None, zeros + 1)
            stretched[tuple(index)] = out
            out = stretched
        return out

    def pad(self, stretched):
        """Step 2: pad (or, where negative, crop) the stretched input by
        ``padding_low`` / ``padding_high``. Pads first, then crops, so a crop
        may reach into the padding of the other side."""
        low = self.padding_low
        high = self.padding_high
        out = F.pad(stretched, (max(low[1], 0), max(high[1], 0), max(low[0], 0), max(high[0], 0)))
        for dim, (lo, hi) in zip((-2, -1), zip(low, high)):
            start, stop = max(-lo, 0), max(-hi, 0)
            if start or stop:
                out = out.narrow(dim, start, out.shape[dim] - start - stop)
        return out

    def prepare(self, input):
        """Steps 1 and 2: the image the stride-1 convolution runs over."""
        return self.pad(self.stretch(input))


def _input_spatial(value, in_channels, op):
    """(H, W) from an int, an (H, W) pair, a (C, H, W) or (N, C, H, W)
    shape, or a tensor; checks C against the weight when given."""
    if isinstance(value, torch.Tensor):
        value = value.shape
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) in (2, 3, 4):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if len(value) > 2 and value[-3] != in_channels:
                raise ValueError(
                    f"{op}: input has {value[-3]} channels, but weight.shape[0]={in_channels} "
                    "(a transposed convolution's weight is (C_in, C_out/groups, kh, kw))"
                )
            return tuple(value[-2:])
    raise TypeError(
        f"{op}: input_shape_or_size must be an int, (H, W), (C, H, W), (N, C, H, W) or a tensor, but got {value!r}"
    )


def _check_at_least(op, name, values, minimum):
    if any(v < minimum for v in values):
        rule = "non-negative" if minimum == 0 else "positive"
        raise ValueError(f"{op}: {name} must be {rule}, but got {name}={tuple(values)}")


def equivalent_conv2d(input_shape_or_size, weight, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """The stride-1 direct convolution equal to ``conv_transpose2d(input,
    weight, None, stride, padding, output_padding, groups, dilation)``, as an
    :class:`EquivalentConv2d`.

    ``input_shape_or_size`` is the transposed convolution's input: an int,
    ``(H, W)``, ``(C, H, W)``, ``(N, C, H, W)`` or a tensor. Raises
    ValueError for arguments ``F.conv_transpose2d`` rejects.
    """
    op = "equivalent_conv2d"
    _check_tensor(weight, "weight", op)
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be 4-d (C_in, C_out/groups, kh, kw), but got shape {tuple(weight.shape)}")
    stride = _pair(stride, "stride", op)
    padding = _pair(padding, "padding", op)
    output_padding = _pair(output_padding, "output_padding", op)
    dilation = _pair(dilation, "dilation", op)
    groups = _int(groups, "groups", op)
    c_in, c_out_group, kh, kw = weight.shape
    size = _input_spatial(input_shape_or_size, c_in, op)
    _check_at_least(op, "input size", size, 1)
    _check_at_least(op, "stride", stride, 1)
    _check_at_least(op, "padding", padding, 0)
    _check_at_least(op, "output_padding", output_padding, 0)
    _check_at_least(op, "dilation", dilation, 1)
    if kh < 1 or kw < 1 or c_in < 1 or c_out_group < 1:
        raise ValueError(f"{op}: weight must have no empty dimension, but got shape {tuple(weight.shape)}")
    if groups < 1 or c_in % groups:
        raise ValueError(f"{op}: groups must be positive and divide weight.shape[0]={c_in}, but got groups={groups}")
    kernel = (kh, kw)
    for i in range(2):
        if output_padding[i] >= max(stride[i], dilation[i]):
            raise ValueError(
                f"{op}: output_padding must be smaller than either stride or dilation, but got "
                f"output_padding={output_padding}, stride={stride}, dilation={dilation}"
            )
    output_size = tuple(
        _ops.transposed_size(size[i], kernel[i], stride[i], padding[i], output_padding[i], dilation[i]) for i in range(2)
    )
    if any(o < 1 for o in output_size):
        raise ValueError(
            f"{op}: the output size {output_size} is not positive for input size {size}, kernel_size={kernel}, "
            f"stride={stride}, padding={padding}, output_padding={output_padding}, dilation={dilation}"
        )
    span = tuple(dilation[i] * (kernel[i] - 1) for i in range(2))  # the dilated kernel's extent minus one
    # Rotate 180° and swap in/out channels within each group:
    # (C_in, C_out/g, kh, kw) -> (g, C_in/g, C_out/g, ...) -> (g, C_out/g, C_in/g, ...) -> (C_out, C_in/g, kh, kw).
    direct = (
        weight.reshape(groups, c_in // groups, c_out_group, kh, kw)
        .transpose(1, 2)
        .reshape(groups * c_out_group, c_in // groups, kh, kw)
        .flip(-2, -1)
    )
    return EquivalentConv2d(
        input_size=size,
        zero_insertion=tuple(s - 1 for s in stride),
        stretched_size=tuple((size[i] - 1) * stride[i] + 1 for i in range(2)),
        padding_low=tuple(span[i] - padding[i] for i in range(2)),
        padding_high=tuple(span[i] - padding[i] + output_padding[i] for i in range(2)),
        weight=direct,
        dilation=dilation,
        groups=groups,
        output_size=output_size,
    )


def conv_transpose2d_as_conv2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """``F.conv_transpose2d`` computed by the guide's recipe, as a stride-1
    :func:`convt_ext.conv2d`: insert ``s-1`` zeros between input pixels, pad
    ``d(k-1)-p`` on each side plus ``output_padding`` on the high side
    (cropping where negative), rotate the kernel 180° and swap in/out
    channels per group, convolve with dilation ``d``.

    Same arguments (``groups`` before ``dilation``) and values as
    ``F.conv_transpose2d``, including unbatched ``(C, H, W)`` input;
    differentiable. See :func:`equivalent_conv2d`.
    """
    op = "conv_transpose2d_as_conv2d"
    _check_tensor(input, "input", op)
    if input.dim() not in (3, 4):
        raise ValueError(f"{op}: input must be 3-d (C, H, W) or 4-d (N, C, H, W), but got a {input.dim()}-d tensor")
    eq = equivalent_conv2d(input.shape, weight, stride, padding, output_padding, groups, dilation)
    return conv2d(eq.prepare(input), eq.weight, bias, 1, 0, eq.dilation, eq.groups)


# ---------------------------------------------------------------- output_padding


def output_padding_for(input_size, output_size, kernel_size, stride=1, padding=0, dilation=1):
    """The ``output_padding`` with which a transposed convolution of an
    ``input_size`` image has ``output_size`` pixels (ints or pairs; the
    result is a pair when any argument is one).

    Raises ValueError, listing the output sizes that can be reached, when the
    needed ``a`` breaks ``0 <= a < max(stride, dilation)``.
    """
    op = "output_padding_for"
    args = dict(
        input_size=input_size,
        output_size=output_size,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
    )
    as_pair = any(isinstance(v, (tuple, list, torch.Size)) for v in args.values())
    pairs = {name: _pair(value, name, op) for name, value in args.items()}
    for name, minimum in (("input_size", 1), ("output_size", 1), ("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1)):
        _check_at_least(op, name, pairs[name], minimum)
    result = []
    for dim in range(2):
        i, o, k, s, p, d = (pairs[name][dim] for name in args)
        a = _ops.output_padding_to_reach(i, o, k, s, p, d)
        if not 0 <= a < max(s, d):
            reachable = [
                size for size in (_ops.transposed_size(i, k, s, p, b, d) for b in range(max(s, d))) if size >= 1
            ]
            where = f" along {('height', 'width')[dim]}" if as_pair else ""
            raise ValueError(
                f"{op}: no output_padding gives output size {o}{where} from input size {i} with kernel_size={k}, "
                f"stride={s}, padding={p}, dilation={d}; output_padding must satisfy 0 <= a < max(stride, dilation)"
                f" = {max(s, d)}, so the reachable output sizes are {reachable}"
            )
        result.append(a)
    return tuple(result) if as_pair else result[0]
