"""How a Python call reaches a torch.ops.convt_ext op: its direct binding
(csrc/calls.cpp) or torch.ops, both through the dispatcher, where the op's
Autograd kernel is C++; or, under a torch.func transform, the op's
autograd.Function (Note [Autograd and torch.func] in convt_ext/_autograd.py).

The rest of the Python side of the ops has one module per concern, each
registering its own kernels when imported (convt_ext/__init__.py imports
them once):

    _geometry.py   the shape formulas
    _fake.py       fake kernels and the memory-format rule
    _autograd.py   derivatives (backward and jvp) in Python, for the calls
                   the C++ Autograd kernels hand it; the differentiable calls
                   that convt_ext.functional makes
    _vmap.py       vmap rules
"""
import torch

from . import _C  # noqa: F401  (loads the library that defines the ops)

ops = torch.ops.convt_ext


def ops_for(d):
    """The dispatcher ops of d spatial dimensions: (conv, conv_transpose, conv_weight)."""
    return (
        getattr(ops, f"conv{d}d"),
        getattr(ops, f"conv_transpose{d}d"),
        getattr(ops, f"conv{d}d_weight"),
    )


def transforms_active():
    """Whether a torch.func transform (grad, vmap, jvp, ...) is active."""
    return torch._C._are_functorch_transforms_active()


class Args:
    """An op's non-tensor arguments as one opaque value. torch.func flattens
    an autograd.Function's arguments as pytrees but pairs their tangents one
    to one with the arguments, so a tuple argument (a stride) would misalign
    them."""

    __slots__ = ("values",)

    def __init__(self, values):
        self.values = tuple(values)


def apply(function, args):
    """The autograd.Function `function` on an op's arguments: its tensor
    arguments (the first function.tensor_args) as they are, the rest as one Args."""
    return function.apply(*args[: function.tensor_args], Args(args[function.tensor_args :]))


def unpack(inputs):
    """An autograd.Function's inputs as the op's arguments."""
    return (*inputs[:-1], *inputs[-1].values)


def call(function, op, entry, *args):
    """op(*args): through its autograd.Function `function` under torch.func;
    through torch.ops where Python-level overrides apply (a tensor's or mode's
    __torch_function__) and while torch.compile traces, which knows the ops;
    else through `entry`, the op's direct binding (csrc/calls.cpp), which
    reaches the same dispatcher op without torch.ops' per-call boxing. Either
    way autocast casts the inputs before the op's C++ Autograd kernel records
    the graph, or passes the call on below autograd where it records none."""
    if transforms_active():
        return apply(function, args)
    if torch.compiler.is_compiling() or torch._C._has_torch_function(args[: function.tensor_args]):
        return op(*args)
    return entry(*args)


def below_autograd(op, *args):
    """op(*args) with the Autograd dispatch key skipped."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
