"""The shape formulas of the Python side, written once: the fake kernels, the
wrappers, nn, explain and the benchmark all import them. They mirror the C++
side's one header (csrc/checks.h, csrc/im2col.h) for fake tensors, where sizes
may be symbolic, and cite the guide's relationships."""

def window_count(size, kernel, stride, padding, dilation):
    """Window positions along one dimension: the guide's relationship 15
    (relationship 6 when dilation is 1). Mirrors csrc/im2col.h for fake
    tensors, where sizes may be symbolic."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def transposed_size(size, kernel, stride, padding, output_padding, dilation):
    """Output size of a transposed convolution: the guide's relationship 14,
    with dilation: o' = s(i'-1) + a + d(k-1) + 1 - 2p."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


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


def prod(values):
    out = 1
    for v in values:
        out = out * v
    return out
