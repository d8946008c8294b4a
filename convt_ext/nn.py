"""Modules: drop-in replacements for torch.nn's convolutions in 1, 2 and 3 spatial dimensions
(``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, and their ``Lazy`` variants), and ``Unfold`` /
``Fold`` for any of them.

Each subclasses the torch module, so its constructor (arguments, order, defaults and
validation), parameters, initialisation, ``repr`` and ``state_dict`` are torch's own; only
the computation is convt_ext's im2col/col2im + GEMM ops. The code is shared across the number
of spatial dimensions: each class only names its torch base and its convt_ext function.

    import convt_ext
    conv = convt_ext.nn.Conv3d(3, 8, 3, padding=1, padding_mode="reflect")
    up = convt_ext.nn.ConvTranspose1d.from_torch(torch_module)

Every module also compiles with torch.jit.script (Note [TorchScript]).
"""
import inspect
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parameter import UninitializedParameter

from ._geometry import default_window_dims
from .functional import (
    _as_batch,
    col2im,
    conv1d,
    conv2d,
    conv3d,
    conv_transpose1d,
    conv_transpose2d,
    conv_transpose3d,
    im2col,
    _unbatch,
)

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Fold",
    "LazyConv1d",
    "LazyConv2d",
    "LazyConv3d",
    "LazyConvTranspose1d",
    "LazyConvTranspose2d",
    "LazyConvTranspose3d",
    "Unfold",
]

# Note [TorchScript]
# TorchScript cannot compile convt_ext.functional (it checks Python types, and
# routes torch.func transforms through autograd.Functions), so each module's
# forward has two paths: eager, through convt_ext.functional (marked
# @torch.jit.unused, so the compiler skips it), and, under
# torch.jit.is_scripting(), the script_* functions below, which take the
# module's attributes (already validated by torch's constructors) to the
# dispatcher ops directly. A saved script module needs `import convt_ext`
# where it is loaded, to register the ops.


def script_conv(
    d: int,
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> Tensor:
    input, unbatched = _as_batch(input, d)
    if d == 1:
        out = torch.ops.convt_ext.conv1d(input, weight, bias, stride, padding, dilation, groups)
    elif d == 2:
        out = torch.ops.convt_ext.conv2d(input, weight, bias, stride, padding, dilation, groups)
    else:
        out = torch.ops.convt_ext.conv3d(input, weight, bias, stride, padding, dilation, groups)
    return _unbatch(out, unbatched)


def script_conv_transpose(
    d: int,
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    output_padding: List[int],
    groups: int,
    dilation: List[int],
) -> Tensor:
    input, unbatched = _as_batch(input, d)
    if d == 1:
        out = torch.ops.convt_ext.conv_transpose1d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    elif d == 2:
        out = torch.ops.convt_ext.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    else:
        out = torch.ops.convt_ext.conv_transpose3d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return _unbatch(out, unbatched)


def _geometry_lists(*values):
    """Unfold/Fold's geometry arguments for script_window_op: each as a list,
    and whether it was a sequence (which fixes the number of dimensions)."""
    lists: List[List[int]] = [list(v) if isinstance(v, (tuple, list)) else [int(v)] for v in values]
    sequences: List[bool] = [isinstance(v, (tuple, list)) for v in values]
    return lists, sequences


def script_window_op(input: Tensor, geometry: List[List[int]], sequences: List[bool], fold: bool) -> Tensor:
    """im2col (fold=False) or col2im (fold=True) with the dimension rule of
    convt_ext.im2col/col2im: the length of the first sequence argument, else
    default_window_dims. A sequence of another length goes to the op as it
    is, to be refused there."""
    d = default_window_dims("col2im" if fold else "im2col", input.dim())
    if d == 0:
        d = 2  # an input im2col refuses: the op says so, naming its dimensions
    for i in range(len(geometry) - 1, -1, -1):
        if sequences[i]:
            d = len(geometry[i])
    args: List[List[int]] = []
    for i in range(len(geometry)):
        args.append(geometry[i] if sequences[i] else [geometry[i][0]] * d)
    if fold:
        return torch.ops.convt_ext.col2im(input, args[0], args[1], args[2], args[3], args[4])
    return torch.ops.convt_ext.im2col(input, args[0], args[1], args[2], args[3])


def _check_type(cls, module, expected):
    if not isinstance(module, expected):
        raise TypeError(
            f"{cls.__name__}.from_torch: expected a {expected.__module__}.{expected.__name__}, "
            f"but got {type(module).__name__}"
        )


def _configuration(module):
    """`module`'s constructor arguments, but device and dtype."""
    kwargs = dict(
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    )
    if module.transposed:
        kwargs["output_padding"] = module.output_padding
    return kwargs


def _copy_from(cls, module, expected):
    """A `cls` with `module`'s configuration, parameters (copied, not shared), dtype,
    device, requires_grad flags and training mode. Consumes no random numbers."""
    _check_type(cls, module, expected)
    params = {name: getattr(module, name) for name in ("weight", "bias")}
    if any(isinstance(p, UninitializedParameter) for p in params.values()):
        raise ValueError(
            f"{cls.__name__}.from_torch: {type(module).__name__} has uninitialized parameters; "
            "run a forward pass through it first"
        )
    # Built on the meta device, so the throwaway initialisation draws no random numbers.
    new = cls(**_configuration(module), device="meta", dtype=params["weight"].dtype)
    for name, p in params.items():
        if p is not None:
            setattr(new, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    return new.train(module.training)


class _ConvMixin:
    """The forward of ``Conv{1,2,3}d``: torch's ``_conv_forward`` with convt_ext's function
    (``_convolve``) in place of ``F.conv{1,2,3}d``. Placed before the torch base class."""

    _torch_base = None  # the torch.nn class this one replaces
    _convolve = None  # the convt_ext function, with F.conv{1,2,3}d's arguments

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_conv_forward(input, weight, bias)
        return self._eager_conv_forward(input, weight, bias)

    @torch.jit.unused
    def _eager_conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.padding_mode != "zeros":
            # As torch: pad explicitly (the high side too for 'same'), then convolve unpadded.
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._convolve(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return self._convolve(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _scripted_conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        d = len(self.kernel_size)
        padding = [0] * d
        low_high = self._reversed_padding_repeated_twice  # (low, high) pairs, last dimension first
        if self.padding_mode != "zeros":
            input = F.pad(input, low_high, mode=self.padding_mode)
        elif isinstance(self.padding, str):
            # 'same': the low side symmetric, any odd pixel padded on the high side.
            extra: List[int] = []
            for i in range(d):
                padding[d - 1 - i] = low_high[2 * i]
                extra += [0, low_high[2 * i + 1] - low_high[2 * i]]
            if sum(extra) > 0:
                input = F.pad(input, extra)
        else:
            padding = [p for p in self.padding]
        return script_conv(d, input, weight, bias, [s for s in self.stride], padding, [x for x in self.dilation], self.groups)

    @classmethod
    def from_torch(cls, module):
        """A convt_ext module with `module`'s configuration, dtype and device, and a copy of
        its parameters (nothing is shared)."""
        return _copy_from(cls, module, cls._torch_base)


# torch's _output_padding helper has changed signature across versions (num_spatial_dims and
# dilation were added); the leading five positional arguments have not.
_OUTPUT_PADDING_ARGS = frozenset(inspect.signature(torch.nn.ConvTranspose2d._output_padding).parameters)


class _ConvTransposeMixin:
    """The forward of ``ConvTranspose{1,2,3}d``: torch's, with convt_ext's function
    (``_convolve``) in place of ``F.conv_transpose{1,2,3}d``."""

    _torch_base = None
    _convolve = None  # with F.conv_transpose{1,2,3}d's arguments (groups before dilation)

    def _resolve_output_padding(self, input, output_size):
        kwargs = {}
        if "num_spatial_dims" in _OUTPUT_PADDING_ARGS:
            kwargs["num_spatial_dims"] = len(self.kernel_size)
        if "dilation" in _OUTPUT_PADDING_ARGS:
            kwargs["dilation"] = self.dilation
        return self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, **kwargs)

    def forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        if torch.jit.is_scripting():
            if self.padding_mode != "zeros":
                raise ValueError("Only `zeros` padding mode is supported for ConvTranspose")
            d = len(self.kernel_size)
            output_padding = self._output_padding(
                input, output_size, self.stride, self.padding, self.kernel_size, d, self.dilation
            )
            return script_conv_transpose(
                d, input, self.weight, self.bias, [s for s in self.stride], [p for p in self.padding],
                output_padding, self.groups, [x for x in self.dilation],
            )  # fmt: skip
        return self._eager_forward(input, output_size)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor, output_size: Optional[List[int]]) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"Only `zeros` padding mode is supported for {self._torch_base.__name__}")
        output_padding = self._resolve_output_padding(input, output_size)
        return self._convolve(
            input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )

    @classmethod
    def from_torch(cls, module):
        """A convt_ext module with `module`'s configuration, dtype and device, and a copy of
        its parameters (nothing is shared)."""
        return _copy_from(cls, module, cls._torch_base)


class Conv1d(_ConvMixin, torch.nn.Conv1d):
    """A drop-in replacement for :class:`torch.nn.Conv1d` (same arguments, parameters,
    initialisation and ``state_dict``; every ``padding_mode``), computed by convt_ext's
    im2col + GEMM :func:`convt_ext.conv1d`."""

    _torch_base = torch.nn.Conv1d
    _convolve = staticmethod(conv1d)


class Conv2d(_ConvMixin, torch.nn.Conv2d):
    """A drop-in replacement for :class:`torch.nn.Conv2d` (same arguments, parameters,
    initialisation and ``state_dict``; every ``padding_mode``), computed by convt_ext's
    im2col + GEMM :func:`convt_ext.conv2d`."""

    _torch_base = torch.nn.Conv2d
    _convolve = staticmethod(conv2d)


class Conv3d(_ConvMixin, torch.nn.Conv3d):
    """A drop-in replacement for :class:`torch.nn.Conv3d` (same arguments, parameters,
    initialisation and ``state_dict``; every ``padding_mode``), computed by convt_ext's
    im2col + GEMM :func:`convt_ext.conv3d`."""

    _torch_base = torch.nn.Conv3d
    _convolve = staticmethod(conv3d)


class ConvTranspose1d(_ConvTransposeMixin, torch.nn.ConvTranspose1d):
    """A drop-in replacement for :class:`torch.nn.ConvTranspose1d` (same arguments,
    parameters, initialisation, ``state_dict`` and ``forward(input, output_size=None)``),
    computed by convt_ext's GEMM + col2im :func:`convt_ext.conv_transpose1d`."""

    _torch_base = torch.nn.ConvTranspose1d
    _convolve = staticmethod(conv_transpose1d)


class ConvTranspose2d(_ConvTransposeMixin, torch.nn.ConvTranspose2d):
    """A drop-in replacement for :class:`torch.nn.ConvTranspose2d` (same arguments,
    parameters, initialisation, ``state_dict`` and ``forward(input, output_size=None)``),
    computed by convt_ext's GEMM + col2im :func:`convt_ext.conv_transpose2d`."""

    _torch_base = torch.nn.ConvTranspose2d
    _convolve = staticmethod(conv_transpose2d)


class ConvTranspose3d(_ConvTransposeMixin, torch.nn.ConvTranspose3d):
    """A drop-in replacement for :class:`torch.nn.ConvTranspose3d` (same arguments,
    parameters, initialisation, ``state_dict`` and ``forward(input, output_size=None)``),
    computed by convt_ext's GEMM + col2im :func:`convt_ext.conv_transpose3d`."""

    _torch_base = torch.nn.ConvTranspose3d
    _convolve = staticmethod(conv_transpose3d)


class _LazyMixin:
    """``from_torch`` for the lazy modules. The rest is torch's ``LazyConv*`` class (placed
    after the convt_ext forward mixin): ``in_channels`` and the parameters come from the first
    input, and that forward makes the module its ``cls_to_become``, the matching convt_ext
    module, before computing. Each names its convt_ext function too, so that a forward called
    directly, before the parameters exist, is refused as torch's is."""

    @classmethod
    def from_torch(cls, module):
        """A copy of torch's lazy module of this kind (``torch.nn.LazyConv2d`` for
        ``LazyConv2d``, ...). Uninitialized: a convt_ext lazy module with its configuration,
        dtype, device, requires_grad flags and training mode. Materialized by
        ``load_state_dict``: the module its first forward would make it, by that class's
        ``from_torch`` (a copy of its parameters). Any other module is a TypeError (torch's lazy
        module becomes a ``torch.nn.Conv2d``, ..., at its first forward: copy that with
        ``convt_ext.nn.Conv2d.from_torch``), and one with only some parameters loaded a
        ValueError."""
        _check_type(cls, module, cls._torch_base)
        params = {name: getattr(module, name) for name in ("weight", "bias")}
        lazy = [isinstance(p, UninitializedParameter) for p in params.values() if p is not None]
        if not any(lazy):
            return cls.cls_to_become.from_torch(module)
        if not all(lazy):
            raise ValueError(
                f"{cls.__name__}.from_torch: {type(module).__name__} has only some of its parameters "
                "initialized; load all of them, or none"
            )
        kwargs = _configuration(module)
        del kwargs["in_channels"]  # 0 until the first input
        # Uninitialized parameters: the constructor draws no random numbers.
        new = cls(**kwargs, device=params["weight"].device, dtype=params["weight"].dtype)
        for name, p in params.items():
            if p is not None:
                getattr(new, name).requires_grad = p.requires_grad
        return new.train(module.training)


class LazyConv1d(_LazyMixin, _ConvMixin, torch.nn.LazyConv1d):
    """A drop-in replacement for :class:`torch.nn.LazyConv1d` (``in_channels`` and the
    parameters from the first input), which its first forward makes a :class:`Conv1d`."""

    _torch_base = torch.nn.LazyConv1d
    _convolve = staticmethod(conv1d)
    cls_to_become = Conv1d


class LazyConv2d(_LazyMixin, _ConvMixin, torch.nn.LazyConv2d):
    """A drop-in replacement for :class:`torch.nn.LazyConv2d` (``in_channels`` and the
    parameters from the first input), which its first forward makes a :class:`Conv2d`."""

    _torch_base = torch.nn.LazyConv2d
    _convolve = staticmethod(conv2d)
    cls_to_become = Conv2d


class LazyConv3d(_LazyMixin, _ConvMixin, torch.nn.LazyConv3d):
    """A drop-in replacement for :class:`torch.nn.LazyConv3d` (``in_channels`` and the
    parameters from the first input), which its first forward makes a :class:`Conv3d`."""

    _torch_base = torch.nn.LazyConv3d
    _convolve = staticmethod(conv3d)
    cls_to_become = Conv3d


class LazyConvTranspose1d(_LazyMixin, _ConvTransposeMixin, torch.nn.LazyConvTranspose1d):
    """A drop-in replacement for :class:`torch.nn.LazyConvTranspose1d` (``in_channels`` and the
    parameters from the first input), which its first forward makes a :class:`ConvTranspose1d`."""

    _torch_base = torch.nn.LazyConvTranspose1d
    _convolve = staticmethod(conv_transpose1d)
    cls_to_become = ConvTranspose1d


class LazyConvTranspose2d(_LazyMixin, _ConvTransposeMixin, torch.nn.LazyConvTranspose2d):
    """A drop-in replacement for :class:`torch.nn.LazyConvTranspose2d` (``in_channels`` and the
    parameters from the first input), which its first forward makes a :class:`ConvTranspose2d`."""

    _torch_base = torch.nn.LazyConvTranspose2d
    _convolve = staticmethod(conv_transpose2d)
    cls_to_become = ConvTranspose2d


class LazyConvTranspose3d(_LazyMixin, _ConvTransposeMixin, torch.nn.LazyConvTranspose3d):
    """A drop-in replacement for :class:`torch.nn.LazyConvTranspose3d` (``in_channels`` and the
    parameters from the first input), which its first forward makes a :class:`ConvTranspose3d`."""

    _torch_base = torch.nn.LazyConvTranspose3d
    _convolve = staticmethod(conv_transpose3d)
    cls_to_become = ConvTranspose3d


class Unfold(torch.nn.Unfold):
    """A drop-in replacement for :class:`torch.nn.Unfold` (same arguments and ``repr``),
    computed by :func:`convt_ext.im2col`, and for any number of spatial dimensions: 1, 2 or 3
    (torch's is 2-d only). The number comes from the arguments as in :func:`convt_ext.im2col`:
    the length of a tuple argument, else 2 for a 3-d or 4-d input and 3 for a 5-d one.

    ``(N, C, *spatial)`` (or unbatched ``(C, *spatial)``) becomes ``(N, C*prod(kernel_size),
    L)``, rows ordered (channel, kernel offset row-major), L the number of window positions.
    Its backward is col2im."""

    def __init__(self, kernel_size, dilation=1, padding=0, stride=1):
        super().__init__(kernel_size, dilation, padding, stride)
        self._geometry, self._sequences = _geometry_lists(kernel_size, dilation, padding, stride)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return script_window_op(input, self._geometry, self._sequences, False)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        return im2col(input, self.kernel_size, self.dilation, self.padding, self.stride)


class Fold(torch.nn.Fold):
    """A drop-in replacement for :class:`torch.nn.Fold` (same arguments and ``repr``),
    computed by :func:`convt_ext.col2im` (the adjoint of :class:`Unfold`: overlapping
    windows are summed), for 1, 2 or 3 spatial dimensions: ``len(output_size)`` when any
    argument is a tuple, as in :func:`convt_ext.col2im`. Its backward is im2col."""

    def __init__(self, output_size, kernel_size, dilation=1, padding=0, stride=1):
        super().__init__(output_size, kernel_size, dilation, padding, stride)
        self._geometry, self._sequences = _geometry_lists(output_size, kernel_size, dilation, padding, stride)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return script_window_op(input, self._geometry, self._sequences, True)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        return col2im(input, self.output_size, self.kernel_size, self.dilation, self.padding, self.stride)
