"""vmap rules of the torch.ops.convt_ext ops, for torch.func.vmap called on
the dispatcher ops directly (the Python calls go through each op's
autograd.Function instead: Note [Autograd and torch.func] in
convt_ext/_autograd.py). Importing this module registers them.

A vmapped dimension is folded into the batch; a vmapped weight makes B
convolutions side by side, run as one with B times the groups.
"""
import torch

from ._ops import ops, ops_for


def _vmapped_first(t, bdim, size):
    """t with its vmapped dimension first (expanded when it has none)."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)


def _into_batch(op, size, x, bdim, *args):
    """op over the vmapped dimension folded into the batch (dimension 0)."""
    x = _vmapped_first(x, bdim, size)
    out = op(x.flatten(0, 1), *args)
    return out.unflatten(0, (size, -1)), 0


def _window_op(op, batched_dims):
    """The vmap rule of im2col or col2im; batched_dims(args): the number of
    dimensions of a batched input."""

    def rule(info, in_dims, input, *args):
        if input.dim() - (in_dims[0] is not None) == batched_dims(args):
            return _into_batch(op, info.batch_size, input, in_dims[0], *args)
        # Unbatched: the vmapped dimension is the batch.
        return op(_vmapped_first(input, in_dims[0], info.batch_size), *args), 0

    return rule


def _channels_into_groups(t, bdim, size):
    """(N, C, ...) vmapped over B -> (N, B*C, ...): the vmapped copies side by
    side along the channels, each to be convolved by its own groups."""
    return _vmapped_first(t, bdim, size).movedim(0, 1).flatten(1, 2)


def _params_into_groups(t, bdim, size):
    """A weight (or bias) vmapped over B -> its B copies stacked along dimension 0."""
    return _vmapped_first(t, bdim, size).flatten(0, 1)


def _convolution(which, groups_at):
    """The vmap rule of conv (which=0) or conv_transpose (which=1), whose
    non-tensor arguments have groups at index groups_at."""

    def rule(info, in_dims, input, weight, bias, *args):
        op = ops_for(len(args[0]))[which]
        input_bdim, weight_bdim, bias_bdim = in_dims[:3]
        size = info.batch_size
        if weight_bdim is None and bias_bdim is None:
            return _into_batch(op, size, input, input_bdim, weight, bias, *args)
        # A vmapped weight: the B convolutions side by side as B*groups groups.
        args = list(args)
        args[groups_at] *= size
        out = op(
            _channels_into_groups(input, input_bdim, size),
            _params_into_groups(weight, weight_bdim, size),
            None if bias is None else _params_into_groups(bias, bias_bdim, size),
            *args,
        )
        return out.unflatten(1, (size, -1)), 1

    return rule


def _conv_weight(info, in_dims, input, grad_output, weight_size, stride, padding, dilation, groups):
    op = ops_for(len(stride))[2]
    size = info.batch_size
    out = op(
        _channels_into_groups(input, in_dims[0], size),
        _channels_into_groups(grad_output, in_dims[1], size),
        [size * weight_size[0], *weight_size[1:]],
        stride,
        padding,
        dilation,
        groups * size,
    )
    return out.unflatten(0, (size, -1)), 0


_RULES = {
    "im2col": _window_op(ops.im2col, lambda args: len(args[0]) + 2),
    "col2im": _window_op(ops.col2im, lambda args: 3),
}
for _d in (1, 2, 3):
    _RULES.update(
        {
            f"conv{_d}d": _convolution(0, groups_at=3),  # (stride, padding, dilation, groups)
            f"conv_transpose{_d}d": _convolution(1, groups_at=3),  # (stride, padding, output_padding, groups, dilation)
            f"conv{_d}d_weight": _conv_weight,
        }
    )

for _name, _rule in _RULES.items():
    torch.library.register_vmap(f"convt_ext::{_name}", _rule)
