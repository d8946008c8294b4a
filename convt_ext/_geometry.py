"""The shape formulas of the Python side, written once: the fake kernels, the
wrappers, nn, explain and the benchmark all import them. They mirror the C++
side's one header (csrc/checks.h, csrc/im2col.h) for fake tensors, where sizes
may be symbolic, and cite the guide's relationships."""

def dilated_extent(kernel, dilation):
    """The pixels a dilated kernel spans along one dimension, d(k-1) + 1: its
    taps `dilation` apart (relationship 15's effective kernel size)."""
    return dilation * (kernel - 1) + 1


def window_count(size, kernel, stride, padding, dilation):
    """Window positions along one dimension: the guide's relationship 15,
    o = (i + 2p - d(k-1) - 1) // s + 1 (relationship 6 when dilation is 1).
    Mirrors csrc/im2col.h for fake tensors, where sizes may be symbolic."""
    return (size + 2 * padding - dilated_extent(kernel, dilation)) // stride + 1


def transposed_size(size, kernel, stride, padding, output_padding, dilation):
    """Output size of a transposed convolution: the guide's relationship 14,
    with dilation: o' = s(i'-1) + a + d(k-1) + 1 - 2p."""
    return (size - 1) * stride + output_padding + dilated_extent(kernel, dilation) - 2 * padding


def output_padding_to_reach(size, target, kernel, stride, padding, dilation):
    """The output_padding a with which a transposed convolution of `size`
    window positions has `target` pixels (the inverse of transposed_size)."""
    return target - transposed_size(size, kernel, stride, padding, 0, dilation)


INT64_MAX = 2**63 - 1


def checked(op, what, value):
    """A size computed by a fake kernel, refused when it would not fit in
    int64 (plain ints only: Python's do not wrap, so the check is exact;
    symbolic sizes are checked by the real kernel)."""
    if isinstance(value, int) and value > INT64_MAX:
        raise ValueError(f"{op}: {what} overflows int64 ({value})")
    return value


def windows(shape, kernel_size, stride, padding, dilation, op="convt_ext"):
    return [
        checked(op, "the window count", window_count(shape[i], kernel_size[i], stride[i], padding[i], dilation[i]))
        for i in range(len(kernel_size))
    ]


def default_window_dims(op: str, input_dim: int) -> int:
    """The number of spatial dimensions D of im2col, im2col_view or col2im
    (op) when no geometry argument is a sequence (the length of one fixes it
    otherwise): 2 for col2im (as F.fold); for the others 1 for a 2-d input,
    2 for a 3-d or 4-d one (as F.unfold), 3 for a 5-d one, and 0 for an
    input they refuse. TorchScript compiles it for convt_ext.nn.Unfold and
    Fold (so it raises nothing: a scripted raise is no ValueError)."""
    if op == "col2im":
        return 2
    return {2: 1, 3: 2, 4: 2, 5: 3}.get(input_dim, 0)


def prod(values):
    out = 1
    for v in values:
        out = out * v
    return out
