"""Modules: drop-in replacements for ``torch.nn.Conv2d`` and ``torch.nn.ConvTranspose2d``.

Each subclasses the torch module, so its constructor (arguments, order, defaults and
validation), parameters, initialisation, ``repr`` and ``state_dict`` are torch's own; only
the convolution itself is computed by convt_ext's im2col/col2im + GEMM ops.

    import convt_ext
    conv = convt_ext.nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
    up = convt_ext.nn.ConvTranspose2d.from_torch(torch_module)
"""
import inspect

import torch
import torch.nn.functional as F

from .functional import conv2d, conv_transpose2d

__all__ = ["Conv2d", "ConvTranspose2d"]


def _copy_from(cls, module, expected):
    """A `cls` with `module`'s configuration, parameters (copied, not shared), dtype,
    device, requires_grad flags and training mode. Consumes no random numbers."""
    if not isinstance(module, expected):
        raise TypeError(
            f"{cls.__name__}.from_torch: expected a {expected.__module__}.{expected.__name__}, "
            f"but got {type(module).__name__}"
        )
    params = {name: getattr(module, name) for name in ("weight", "bias")}
    if any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in params.values()):
        raise ValueError(
            f"{cls.__name__}.from_torch: {type(module).__name__} has uninitialized parameters; "
            "run a forward pass through it first"
        )
    kwargs = dict(
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        bias=params["bias"] is not None,
        padding_mode=module.padding_mode,
    )
    if module.transposed:
        kwargs["output_padding"] = module.output_padding
    # Built on the meta device, so the throwaway initialisation draws no random numbers.
    new = cls(**kwargs, device="meta", dtype=params["weight"].dtype)
    for name, p in params.items():
        if p is not None:
            setattr(new, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    return new.train(module.training)


class Conv2d(torch.nn.Conv2d):
    """A drop-in replacement for :class:`torch.nn.Conv2d` (same arguments, parameters,
    initialisation and ``state_dict``; every ``padding_mode``), computed by convt_ext's
    im2col + GEMM :func:`convt_ext.conv2d`."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            # As torch: pad explicitly (the high side too for 'same'), then convolve unpadded.
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def from_torch(cls, module):
        """A convt_ext Conv2d with `module`'s configuration, dtype and device, and a copy of
        its parameters (nothing is shared)."""
        return _copy_from(cls, module, torch.nn.Conv2d)


# torch's _output_padding helper has changed signature across versions (num_spatial_dims and
# dilation were added); the leading five positional arguments have not.
_OUTPUT_PADDING_ARGS = frozenset(inspect.signature(torch.nn.ConvTranspose2d._output_padding).parameters)


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """A drop-in replacement for :class:`torch.nn.ConvTranspose2d` (same arguments,
    parameters, initialisation, ``state_dict`` and ``forward(input, output_size=None)``),
    computed by convt_ext's GEMM + col2im :func:`convt_ext.conv_transpose2d`."""

    def _resolve_output_padding(self, input, output_size):
        kwargs = {}
        if "num_spatial_dims" in _OUTPUT_PADDING_ARGS:
            kwargs["num_spatial_dims"] = 2
        if "dilation" in _OUTPUT_PADDING_ARGS:
            kwargs["dilation"] = self.dilation
        return self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, **kwargs)

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        output_padding = self._resolve_output_padding(input, output_size)
        return conv_transpose2d(
            input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )

    @classmethod
    def from_torch(cls, module):
        """A convt_ext ConvTranspose2d with `module`'s configuration, dtype and device, and a
        copy of its parameters (nothing is shared)."""
        return _copy_from(cls, module, torch.nn.ConvTranspose2d)
