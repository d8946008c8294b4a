"""Explicit relationships: convolution as a matrix, and the transposed
convolution as a direct one, in 1, 2 and 3 spatial dimensions.

Sections 4.1-4.3 and 5 of Dumoulin & Visin, "A guide to convolution arithmetic
for deep learning", in code:

- :func:`im2col_matrix` is the one-channel selection matrix ``U`` of im2col;
  col2im is ``U^T``.
- :func:`conv_matrix` is the sparse matrix ``C`` of a convolution; the
  transposed convolution is ``C^T`` (its adjoint, not its inverse).
- :func:`equivalent_conv1d`, :func:`equivalent_conv2d` and
  :func:`equivalent_conv3d` give the direct convolution that a transposed
  convolution equals (the guide's relationships 8-14, with dilation and
  groups, applied to each dimension); :func:`conv_transpose1d_as_conv1d`,
  :func:`conv_transpose2d_as_conv2d` and :func:`conv_transpose3d_as_conv3d`
  run it.
- :func:`output_padding_for` picks the ``output_padding`` that gives a wanted
  output size.

The number of spatial dimensions D is a parameter of one implementation:
every relation holds per dimension, and the flattened indices are row-major
over the D dimensions. Every size formula comes from :mod:`convt_ext._geometry`
and every index from the C++ header ``csrc/im2col.h`` (through
``torch.ops.convt_ext.im2col_indices``); nothing here derives them a second
time. See ``docs/relationships.md``.
"""
import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from . import _geometry
from .functional import _check_tensor, _int, _ntuple, conv1d, conv2d, conv3d

__all__ = [
    "EquivalentConv",
    "EquivalentConv1d",
    "EquivalentConv2d",
    "EquivalentConv3d",
    "conv_matrix",
    "conv_transpose1d_as_conv1d",
    "conv_transpose2d_as_conv2d",
    "conv_transpose3d_as_conv3d",
    "equivalent_conv1d",
    "equivalent_conv2d",
    "equivalent_conv3d",
    "im2col_matrix",
    "output_padding_for",
]

ops = torch.ops.convt_ext

Sizes = Tuple[int, ...]

DIMS = (1, 2, 3)
# Per number of spatial dimensions: the names of the sizes, of the kernel's
# extents and of the axes (for messages).
_SIZE_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}
_KERNEL_NAMES = {1: ("k",), 2: ("kh", "kw"), 3: ("kd", "kh", "kw")}
_AXES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}
_SEQUENCE = (tuple, list, torch.Size)


def _shape_text(*names):
    """'(C, H, W)'; a single name keeps its tuple comma: '(L,)'."""
    return "(" + ", ".join(names) + ("," if len(names) == 1 else "") + ")"


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _size_dims(value, name, op, default=2):
    """D from a size argument: the length of a sequence of 1-3 ints, or
    `default` for an int."""
    if _is_int(value):
        return default
    if isinstance(value, _SEQUENCE) and len(value) in DIMS and all(_is_int(v) for v in value):
        return len(value)
    raise TypeError(f"{op}: {name} must be an int or a sequence of 1, 2 or 3 ints, but got {name}={value!r}")


def _weight_dims(weight, op, layout, dims=None):
    """The number of spatial dimensions of `weight` ((out, in, *kernel_size) in
    `layout`'s words), checked against `dims` when it is fixed."""
    _check_tensor(weight, "weight", op)
    if dims is not None:
        if weight.dim() != dims + 2:
            shape = _shape_text(*layout, *_KERNEL_NAMES[dims])
            raise ValueError(f"{op}: weight must be {dims + 2}-d {shape}, but got shape {tuple(weight.shape)}")
        return dims
    if weight.dim() - 2 not in DIMS:
        shape = _shape_text(*layout, "*kernel_size")
        raise ValueError(f"{op}: weight must be 3-d, 4-d or 5-d {shape}, but got shape {tuple(weight.shape)}")
    return weight.dim() - 2


# ---------------------------------------------------------------- matrices


def im2col_matrix(input_size, kernel_size, dilation=1, padding=0, stride=1, *, dtype=torch.float64, device=None):
    """The im2col selection matrix ``U`` of one channel, as a coalesced
    ``torch.sparse_coo`` tensor of shape ``(prod(kernel_size)*L,
    prod(input_size))``, L the number of window positions.

    The number of spatial dimensions D is ``len(input_size)`` (1, 2 or 3; an
    int ``input_size`` means 2-d); the other arguments are ints or D-tuples.
    Kernel offsets, window positions and pixels are flattened row-major over
    the D dimensions; in 2-d ``U[(ki*kw + kj)*L + l, ih*W + iw] = 1`` where
    window position ``l`` taps pixel ``(ih, iw)`` at kernel offset
    ``(ki, kj)``. Taps into the padding have no entry. For a one-channel image
    ``x`` of size ``input_size`` and a column matrix ``c``::

        im2col(x).flatten() == U @ x.flatten()
        col2im(c, input_size, ...).flatten() == U.t() @ c.flatten()

    The entries come from the C++ index header that the kernels use.
    """
    op = "im2col_matrix"
    dims = _size_dims(input_size, "input_size", op)
    input_size = _ntuple(input_size, dims, "input_size", op)
    kernel_size = _ntuple(kernel_size, dims, "kernel_size", op)
    dilation = _ntuple(dilation, dims, "dilation", op)
    padding = _ntuple(padding, dims, "padding", op)
    stride = _ntuple(stride, dims, "stride", op)
    indices = ops.im2col_indices(input_size, kernel_size, dilation, padding, stride)
    windows = _geometry.windows(input_size, kernel_size, stride, padding, dilation)
    shape = (math.prod(kernel_size) * math.prod(windows), math.prod(input_size))
    indices = indices.to(device) if device is not None else indices
    values = torch.ones(indices.shape[1], dtype=dtype, device=indices.device)
    # im2col_indices emits one entry per row, rows in increasing order.
    return torch.sparse_coo_tensor(indices, values, shape, is_coalesced=True, check_invariants=False)


def conv_matrix(weight, input_size, stride=1, padding=0, dilation=1, groups=1):
    """The matrix ``C`` of a D-d convolution (D = ``weight.dim() - 2``: 1, 2
    or 3), as a coalesced ``torch.sparse_coo`` tensor of shape
    ``(C_out*prod(output size), C_in*prod(input_size))`` with ``weight``'s
    dtype and device. ``input_size`` is an int or a D-tuple.

    In 2-d, for ``x`` of shape ``(C_in, H, W)`` and ``y`` of shape
    ``(C_out, OH, OW)`` (and likewise with conv1d/conv3d)::

        conv2d(x[None], weight, None, stride, padding, dilation, groups).flatten() == C @ x.flatten()
        conv_transpose2d(y[None], weight, None, stride, padding, a, groups, dilation).flatten() == C.t() @ y.flatten()

    with ``a = (H + 2p - d(k-1) - 1) mod s`` per dimension.

    ``C`` is the one-channel im2col matrix ``U`` (:func:`im2col_matrix`)
    with each entry ``U[(k_off, l), pixel]`` replaced by the weight
    ``weight[o, c, k_off]`` for every (out channel ``o``, in channel ``c``)
    of a group: ``C[(o, l), (c, pixel)] = weight[o, c - g*C_in/groups, k_off]``
    (``k_off``, ``l`` and ``pixel`` flattened row-major over the D
    dimensions). Differentiable in ``weight``.
    """
    op = "conv_matrix"
    dims = _weight_dims(weight, op, ("C_out", "C_in/groups"))
    if isinstance(input_size, _SEQUENCE) and len(input_size) != dims:
        raise ValueError(
            f"{op}: input_size must have {dims} entries for a {dims + 2}-d weight (a {dims}-d convolution), "
            f"but got input_size={input_size!r}"
        )
    input_size = _ntuple(input_size, dims, "input_size", op)
    stride = _ntuple(stride, dims, "stride", op)
    padding = _ntuple(padding, dims, "padding", op)
    dilation = _ntuple(dilation, dims, "dilation", op)
    groups = _int(groups, "groups", op)
    c_out, c_in_group = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    if groups < 1 or c_out % groups:
        raise ValueError(f"{op}: groups must be positive and divide weight.shape[0]={c_out}, but got groups={groups}")
    indices = ops.im2col_indices(input_size, kernel, dilation, padding, stride).to(weight.device)
    windows = _geometry.windows(input_size, kernel, stride, padding, dilation)
    L, P = math.prod(windows), math.prod(input_size)
    k_off, l = indices[0] // L, indices[0] % L  # U's row = k_off*L + l
    pixel = indices[1]

    o = torch.arange(c_out, device=weight.device)
    ci = torch.arange(c_in_group, device=weight.device)
    c = (o // (c_out // groups))[:, None] * c_in_group + ci[None, :]  # (C_out, C_in/g): absolute in channel
    rows = (o[:, None, None] * L + l).expand(c_out, c_in_group, -1)
    cols = c[:, :, None] * P + pixel
    values = weight.reshape(c_out, c_in_group, math.prod(kernel))[:, :, k_off]  # (C_out, C_in/g, nnz)
    shape = (c_out * L, c_in_group * groups * P)
    C = torch.sparse_coo_tensor(
        torch.stack([rows.reshape(-1), cols.reshape(-1)]), values.reshape(-1), shape, check_invariants=False
    )
    return C.coalesce()


# ---------------------------------------------------------------- transposed as direct


_EQUIVALENT_DOC = """The direct convolution that a transposed convolution equals{where}.

    The guide's relationship 14 (8-13 are its special cases), extended to
    dilation ``d`` and groups, in each spatial dimension: ``conv_transpose{n}d(x,
    w, stride=s, padding=p, output_padding=a, groups=g, dilation=d)`` is a
    stride-1 ``conv{n}d`` of the input after

    1. ``zero_insertion = s-1`` zeros between neighbouring pixels (size
       ``stretched_size = (i'-1)s + 1``, the guide's ``ĩ'``);
    2. ``padding_low = d(k-1) - p`` zeros before and ``padding_high =
       d(k-1) - p + a`` after (negative: crop that many pixels), the guide's
       ``p' = k - p - 1`` when d = 1, with its ``a`` extra pixels on the
       high side;

    with ``weight`` (``{direct}``: the transposed convolution's
    ``{transposed}`` kernel {flip} and with in/out channels swapped within
    each group), ``dilation`` d, ``groups`` g, stride 1. Every field is a
    tuple with one entry per spatial dimension ({axes}) except ``weight`` and
    ``groups``. ``output_size`` is ``o' = s(i'-1) + a + d(k-1) + 1 - 2p``
    (relationship 14 with dilation).

    Instances compare by identity (``weight`` is a tensor).
    """


def _equivalent_doc(dims=None):
    if dims is None:
        return _EQUIVALENT_DOC.format(
            where=", in D = 1, 2 or 3 spatial dimensions",
            n="N",
            direct="(C_out, C_in/groups, *kernel_size)",
            transposed="(C_in, C_out/groups, *kernel_size)",
            flip="reversed along every spatial axis",
            axes="D of them",
        )
    kernel = ", ".join(_KERNEL_NAMES[dims])
    return _EQUIVALENT_DOC.format(
        where=f" in {dims}-d",
        n=dims,
        direct=f"(C_out, C_in/groups, {kernel})",
        transposed=f"(C_in, C_out/groups, {kernel})",
        flip="rotated 180°" if dims == 2 else "reversed along every spatial axis",
        axes=", ".join(_AXES[dims]),
    )


@dataclass(frozen=True, eq=False)
class EquivalentConv:
    __doc__ = _equivalent_doc()

    input_size: Sizes
    zero_insertion: Sizes
    stretched_size: Sizes
    padding_low: Sizes
    padding_high: Sizes
    weight: torch.Tensor
    dilation: Sizes
    groups: int
    output_size: Sizes

    def __repr__(self):
        fields = ", ".join(
            f"{name}={tuple(getattr(self, name).shape) if name == 'weight' else getattr(self, name)}"
            for name in self.__dataclass_fields__
        )
        return f"{type(self).__name__}({fields})"

    @property
    def dims(self):
        """The number of spatial dimensions."""
        return len(self.input_size)

    @property
    def padded_size(self):
        """The size of the stretched, padded input the stride-1 conv reads."""
        return tuple(self.stretched_size[i] + self.padding_low[i] + self.padding_high[i] for i in range(self.dims))

    def _spatial_dims(self):
        return range(-self.dims, 0)

    def stretch(self, input):
        """Step 1: insert ``zero_insertion`` zeros between the pixels of
        ``input`` (..., *spatial). Differentiable."""
        out = input
        for dim, zeros in zip(self._spatial_dims(), self.zero_insertion):
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
        pads = []
        for lo, hi in zip(reversed(self.padding_low), reversed(self.padding_high)):  # F.pad: last dim first
            pads += [max(lo, 0), max(hi, 0)]
        out = F.pad(stretched, tuple(pads))
        for dim, lo, hi in zip(self._spatial_dims(), self.padding_low, self.padding_high):
            start, stop = max(-lo, 0), max(-hi, 0)
            if start or stop:
                out = out.narrow(dim, start, out.shape[dim] - start - stop)
        return out

    def prepare(self, input):
        """Steps 1 and 2: the image the stride-1 convolution runs over."""
        return self.pad(self.stretch(input))


class EquivalentConv1d(EquivalentConv):
    __doc__ = _equivalent_doc(1)


class EquivalentConv2d(EquivalentConv):
    __doc__ = _equivalent_doc(2)


class EquivalentConv3d(EquivalentConv):
    __doc__ = _equivalent_doc(3)


_EQUIVALENT_CLASSES = {1: EquivalentConv1d, 2: EquivalentConv2d, 3: EquivalentConv3d}


def _input_spatial(value, dims, in_channels, op):
    """The D spatial sizes from an int, a D-tuple, a (C, *spatial) or
    (N, C, *spatial) shape, or a tensor; checks C against the weight."""
    if isinstance(value, torch.Tensor):
        value = value.shape
    if _is_int(value):
        return (value,) * dims
    if isinstance(value, _SEQUENCE) and len(value) in (dims, dims + 1, dims + 2):
        if all(_is_int(v) for v in value):
            if len(value) > dims and value[-dims - 1] != in_channels:
                kernel = ", ".join(_KERNEL_NAMES[dims])
                raise ValueError(
                    f"{op}: input has {value[-dims - 1]} channels, but weight.shape[0]={in_channels} "
                    f"(a transposed convolution's weight is (C_in, C_out/groups, {kernel}))"
                )
            return tuple(value[-dims:])
    names = _SIZE_NAMES[dims]
    forms = f"{_shape_text(*names)}, {_shape_text('C', *names)}, {_shape_text('N', 'C', *names)}"
    raise TypeError(f"{op}: input_shape_or_size must be an int, {forms} or a tensor, but got {value!r}")


def _check_at_least(op, name, values, minimum):
    if any(v < minimum for v in values):
        rule = "non-negative" if minimum == 0 else "positive"
        raise ValueError(f"{op}: {name} must be {rule}, but got {name}={tuple(values)}")


def _equivalent_conv(dims, op, input_shape_or_size, weight, stride, padding, output_padding, groups, dilation):
    """The generic body of equivalent_conv{1,2,3}d: D = `dims`."""
    _weight_dims(weight, op, ("C_in", "C_out/groups"), dims)
    stride = _ntuple(stride, dims, "stride", op)
    padding = _ntuple(padding, dims, "padding", op)
    output_padding = _ntuple(output_padding, dims, "output_padding", op)
    dilation = _ntuple(dilation, dims, "dilation", op)
    groups = _int(groups, "groups", op)
    c_in, c_out_group = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    size = _input_spatial(input_shape_or_size, dims, c_in, op)
    _check_at_least(op, "input size", size, 1)
    _check_at_least(op, "stride", stride, 1)
    _check_at_least(op, "padding", padding, 0)
    _check_at_least(op, "output_padding", output_padding, 0)
    _check_at_least(op, "dilation", dilation, 1)
    if min(kernel) < 1 or c_in < 1 or c_out_group < 1:
        raise ValueError(f"{op}: weight must have no empty dimension, but got shape {tuple(weight.shape)}")
    if groups < 1 or c_in % groups:
        raise ValueError(f"{op}: groups must be positive and divide weight.shape[0]={c_in}, but got groups={groups}")
    axes = range(dims)
    for i in axes:
        if output_padding[i] >= max(stride[i], dilation[i]):
            raise ValueError(
                f"{op}: output_padding must be smaller than either stride or dilation, but got "
                f"output_padding={output_padding}, stride={stride}, dilation={dilation}"
            )
    output_size = tuple(
        _geometry.transposed_size(size[i], kernel[i], stride[i], padding[i], output_padding[i], dilation[i]) for i in axes
    )
    if any(o < 1 for o in output_size):
        raise ValueError(
            f"{op}: the output size {output_size} is not positive for input size {size}, kernel_size={kernel}, "
            f"stride={stride}, padding={padding}, output_padding={output_padding}, dilation={dilation}"
        )
    span = tuple(_geometry.dilated_extent(kernel[i], dilation[i]) - 1 for i in axes)
    # Reverse every spatial axis (rot180 in 2-d) and swap in/out channels within each group:
    # (C_in, C_out/g, *k) -> (g, C_in/g, C_out/g, *k) -> (g, C_out/g, C_in/g, *k) -> (C_out, C_in/g, *k).
    direct = (
        weight.reshape(groups, c_in // groups, c_out_group, *kernel)
        .transpose(1, 2)
        .reshape(groups * c_out_group, c_in // groups, *kernel)
        .flip(tuple(range(2, 2 + dims)))
    )
    return _EQUIVALENT_CLASSES[dims](
        input_size=size,
        zero_insertion=tuple(s - 1 for s in stride),
        stretched_size=tuple((size[i] - 1) * stride[i] + 1 for i in axes),
        padding_low=tuple(span[i] - padding[i] for i in axes),
        padding_high=tuple(span[i] - padding[i] + output_padding[i] for i in axes),
        weight=direct,
        dilation=dilation,
        groups=groups,
        output_size=output_size,
    )


def _as_direct(dims, op, equivalent, conv, input, weight, bias, stride, padding, output_padding, groups, dilation):
    """The generic body of conv_transpose{1,2,3}d_as_conv{1,2,3}d: the recipe
    of `equivalent`, then a stride-1 `conv`."""
    _check_tensor(input, "input", op)
    if input.dim() not in (dims + 1, dims + 2):
        names = _SIZE_NAMES[dims]
        raise ValueError(
            f"{op}: input must be {dims + 1}-d {_shape_text('C', *names)} or {dims + 2}-d {_shape_text('N', 'C', *names)}, "
            f"but got a {input.dim()}-d tensor"
        )
    eq = equivalent(input.shape, weight, stride, padding, output_padding, groups, dilation)
    return conv(eq.prepare(input), eq.weight, bias, 1, 0, eq.dilation, eq.groups)


_EQUIVALENT_FN_DOC = """The stride-1 direct convolution equal to ``conv_transpose{n}d(input,
    weight, None, stride, padding, output_padding, groups, dilation)``, as an
    :class:`EquivalentConv{n}d`.

    ``input_shape_or_size`` is the transposed convolution's input: an int,
    ``{s}``, ``{cs}``, ``{ncs}`` or a tensor. Raises ValueError for arguments
    ``F.conv_transpose{n}d`` rejects.
    """

_AS_DIRECT_DOC = """``F.conv_transpose{n}d`` computed by the guide's recipe, as a stride-1
    :func:`convt_ext.conv{n}d`: insert ``s-1`` zeros between input pixels, pad
    ``d(k-1)-p`` on each side plus ``output_padding`` on the high side
    (cropping where negative), {flip} and swap in/out channels per group,
    convolve with dilation ``d``. Each step acts on every spatial dimension.

    Same arguments (``groups`` before ``dilation``) and values as
    ``F.conv_transpose{n}d``, including unbatched ``{cs}`` input;
    differentiable. See :func:`equivalent_conv{n}d`.
    """


def _documented(template, dims):
    """Gives the decorated D-d function `template`'s docstring for D = `dims`."""
    names = _SIZE_NAMES[dims]
    doc = template.format(
        n=dims,
        s=_shape_text(*names),
        cs=_shape_text("C", *names),
        ncs=_shape_text("N", "C", *names),
        flip="rotate the kernel 180°" if dims == 2 else "reverse the kernel along every axis",
    )

    def document(fn):
        fn.__doc__ = doc
        return fn

    return document


@_documented(_EQUIVALENT_FN_DOC, 1)
def equivalent_conv1d(input_shape_or_size, weight, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _equivalent_conv(
        1, "equivalent_conv1d", input_shape_or_size, weight, stride, padding, output_padding, groups, dilation
    )


@_documented(_EQUIVALENT_FN_DOC, 2)
def equivalent_conv2d(input_shape_or_size, weight, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _equivalent_conv(
        2, "equivalent_conv2d", input_shape_or_size, weight, stride, padding, output_padding, groups, dilation
    )


@_documented(_EQUIVALENT_FN_DOC, 3)
def equivalent_conv3d(input_shape_or_size, weight, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _equivalent_conv(
        3, "equivalent_conv3d", input_shape_or_size, weight, stride, padding, output_padding, groups, dilation
    )


@_documented(_AS_DIRECT_DOC, 1)
def conv_transpose1d_as_conv1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _as_direct(
        1, "conv_transpose1d_as_conv1d", equivalent_conv1d, conv1d,
        input, weight, bias, stride, padding, output_padding, groups, dilation,
    )  # fmt: skip


@_documented(_AS_DIRECT_DOC, 2)
def conv_transpose2d_as_conv2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _as_direct(
        2, "conv_transpose2d_as_conv2d", equivalent_conv2d, conv2d,
        input, weight, bias, stride, padding, output_padding, groups, dilation,
    )  # fmt: skip


@_documented(_AS_DIRECT_DOC, 3)
def conv_transpose3d_as_conv3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _as_direct(
        3, "conv_transpose3d_as_conv3d", equivalent_conv3d, conv3d,
        input, weight, bias, stride, padding, output_padding, groups, dilation,
    )  # fmt: skip




# ---------------------------------------------------------------- output_padding


def output_padding_for(input_size, output_size, kernel_size, stride=1, padding=0, dilation=1):
    """The ``output_padding`` with which a transposed convolution of an
    ``input_size`` image has ``output_size`` pixels, in any number of spatial
    dimensions D (1, 2 or 3): ints, or D-tuples. The result is a D-tuple when
    any argument is a sequence, else an int.

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
    sequences = [(name, value) for name, value in args.items() if isinstance(value, _SEQUENCE)]
    as_tuple = bool(sequences)
    dims = _size_dims(sequences[0][1], sequences[0][0], op) if as_tuple else 1
    tuples = {name: _ntuple(value, dims, name, op) for name, value in args.items()}
    for name, minimum in (("input_size", 1), ("output_size", 1), ("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1)):
        _check_at_least(op, name, tuples[name], minimum)
    result = []
    for dim in range(dims):
        i, o, k, s, p, d = (tuples[name][dim] for name in args)
        a = _geometry.output_padding_to_reach(i, o, k, s, p, d)
        if not 0 <= a < max(s, d):
            reachable = [
                size for size in (_geometry.transposed_size(i, k, s, p, b, d) for b in range(max(s, d))) if size >= 1
            ]
            where = f" along {_AXES[dims][dim]}" if as_tuple else ""
            raise ValueError(
                f"{op}: no output_padding gives output size {o}{where} from input size {i} with kernel_size={k}, "
                f"stride={s}, padding={p}, dilation={d}; output_padding must satisfy 0 <= a < max(stride, dilation)"
                f" = {max(s, d)}, so the reachable output sizes are {reachable}"
            )
        result.append(a)
    return tuple(result) if as_tuple else result[0]
