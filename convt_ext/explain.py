"""A runnable walk-through of the transposed convolution.

    python -m convt_ext.explain
    python -m convt_ext.explain --kernel 3 --stride 3 --padding 1 --dilation 2 --size 7

It answers two questions about the example of "A guide to convolution
arithmetic for deep learning" (Dumoulin & Visin), section 4.1:

1. Why is ``C^T y1`` not ``x1.grad``?  Backpropagation multiplies ``C^T`` by
   the upstream gradient (here a tensor of ones), not by the output ``y1``.
2. Why does ``conv_transpose2d(y1, w)`` differ from ``conv2d(y1, w,
   padding=2)``?  The direct convolution needs the kernel rotated by 180°
   (and, for stride s, s-1 zeros between input pixels, padding d(k-1)-p on
   each side plus output_padding on the high side, and in/out channels
   swapped per group).

Then it goes through stride with zero insertion and output_padding, and a
dilated, grouped case, in the geometry the flags choose. Every claim is
computed in float64 and marked ✓ when it comes out as the text says (an
equality that holds, or an expected difference) and ✗ when it does not; the
exit status is 0 when every claim holds. :func:`check_claims` returns the
claims for tests.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from . import _ops
from .functional import conv2d, conv_transpose2d
from .matrix import conv_matrix, conv_transpose2d_as_conv2d, equivalent_conv2d, output_padding_for

__all__ = ["Walkthrough", "check_claims", "format_matrix", "main"]

DTYPE = torch.float64
OK, BAD = "✓", "✗"
# Used when stdout cannot encode the Unicode symbols.
ASCII = {
    OK: "[ok]",
    BAD: "[FAIL]",
    "ᵀ": "^T",
    "·": "*",
    "≠": "!=",
    "≤": "<=",
    "×": "x",
    "°": " deg",
    "−": "-",
    "→": "->",
    "⌊": "floor(",
    "⌋": ")",
    "⟨": "<",
    "⟩": ">",
    "′": "'",
    "═": "=",
    "─": "-",
    "–": "-",
    "…": "...",
}
MAX_COLUMNS = 18  # matrices wider than this are summarised, not printed


# ---------------------------------------------------------------- formatting


def format_matrix(t, digits=2, zero=None, indent="    "):
    """A 1-d or 2-d tensor as right-aligned text rows, one line per row.

    Integer-valued tensors print without decimals, others with `digits`
    decimals; exact zeros print as `zero` when given (for sparse matrices).
    """
    t = t.detach().to("cpu", torch.float64)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise ValueError(f"format_matrix: expected a 1-d or 2-d tensor, but got shape {tuple(t.shape)}")
    integral = bool(torch.all(t == t.round()))

    def cell(v):
        if zero is not None and v == 0:
            return zero
        text = f"{v:.0f}" if integral else f"{v:.{digits}f}"
        return text[1:] if text.startswith("-") and not text.strip("-0.") else text  # no "-0.00"

    cells = [[cell(v) for v in row] for row in t.tolist()]
    width = max((len(c) for row in cells for c in row), default=1)
    return "\n".join(indent + "[ " + " ".join(c.rjust(width) for c in row) + " ]" for row in cells)


def _size(t):
    return "×".join(str(n) for n in t.shape)


def _same(a, b):
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-10)


class Walkthrough:
    """Collects claims and, when `out` is given (a callable taking one line),
    prints headed sections, text, matrices and ✓/✗ claim lines."""

    def __init__(self, out=None):
        self.out = out
        self.claims = []

    def say(self, text=""):
        if self.out is not None:
            for line in str(text).split("\n"):
                self.out(line)

    def section(self, title):
        self.say()
        self.say(title)
        self.say("═" * len(title))

    def matrix(self, label, t, **kw):
        t = t.detach()
        while t.dim() > 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() > 2 or (t.dim() == 2 and t.shape[1] > MAX_COLUMNS) or t.shape[-1] > MAX_COLUMNS:
            self.say(f"  {label}: a {_size(t)} tensor (too large to print)")
            return
        self.say(f"  {label} ({_size(t)}):")
        self.say(format_matrix(t, **kw))

    def claim(self, text, holds):
        holds = bool(holds)
        self.claims.append((text, holds))
        self.say(f"  {OK if holds else BAD} {text}")
        return holds

    def same(self, text, a, b):
        return self.claim(text, _same(a, b))

    def differ(self, text, a, b):
        return self.claim(text, not _same(a, b))


# ---------------------------------------------------------------- the sections


def _hand_built_C(w):
    """The guide's 4×16 matrix for a 3×3 kernel over a 4×4 input, written out
    row by row as in its section 4.1: output pixel (r, c) reads input rows
    r..r+2, columns c..c+2."""
    C = torch.zeros(4, 16, dtype=w.dtype)
    for row, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for ki in range(3):
            start = (r + ki) * 4 + c
            C[row, start : start + 3] = w[ki]
    return C


def guide_example(wt, gen):
    """Section 4.1's example, its two puzzles and their answers."""
    wt.section("1. The guide's example: convolution as a matrix (section 4.1, relationship 8)")
    x = torch.arange(1, 17, dtype=DTYPE).reshape(4, 4)
    w = torch.rand(3, 3, generator=gen, dtype=DTYPE)
    x1 = x.view(1, 1, 4, 4).clone().requires_grad_()
    w1 = w.view(1, 1, 3, 3)
    y1 = F.conv2d(x1, w1)
    y1.backward(torch.ones_like(y1))
    wt.say("  x1 = arange(1, 17) as 1×1×4×4, w1 = a random 3×3 kernel, y1 = conv2d(x1, w1),")
    wt.say("  y1.backward(ones_like(y1)).")
    wt.matrix("x", x)
    wt.matrix("w", w)
    wt.matrix("y1 = conv2d(x1, w1)", y1)

    C = _hand_built_C(w)
    wt.say()
    wt.say("  The 4×16 matrix C, built by hand as in the guide (row = output pixel, column = input pixel):")
    wt.matrix("C", C, zero=".")
    wt.same("convt_ext.conv_matrix(w1, (4, 4)).to_dense() is this C", conv_matrix(w1, (4, 4)).to_dense(), C)
    wt.same("C·x.flatten() = conv2d(x1, w1).flatten()", C @ x.flatten(), y1.detach().flatten())

    ones = torch.ones(4, dtype=DTYPE)
    ct_ones = (C.t() @ ones).view(4, 4)
    ct_y1 = (C.t() @ y1.detach().flatten()).view(4, 4)
    wt.say()
    wt.say("  Puzzle 1: torch.mm(C.t(), y1.view(-1, 1)) is not x1.grad. Why?")
    wt.matrix("x1.grad", x1.grad)
    wt.matrix("Cᵀ·ones", ct_ones)
    wt.matrix("Cᵀ·y1", ct_y1)
    wt.differ("Cᵀ·y1 ≠ x1.grad", ct_y1, x1.grad[0, 0])
    wt.same("x1.grad = Cᵀ·ones: backward multiplies Cᵀ by the upstream gradient (ones here), not by y1", x1.grad[0, 0], ct_ones)
    (grad_by_y1,) = torch.autograd.grad(F.conv2d(x1, w1), x1, y1.detach())
    wt.same("with y1 as the upstream gradient, the input gradient is Cᵀ·y1", grad_by_y1[0, 0], ct_y1)
    wt.same("Cᵀ·y1 = conv_transpose2d(y1, w1): the transposed convolution is Cᵀ", ct_y1, F.conv_transpose2d(y1.detach(), w1)[0, 0])

    wt.say()
    wt.say("  Puzzle 2: conv_transpose2d(y1, w1) differs from conv2d(y1, w1, padding=2). Why?")
    yd = y1.detach()
    transposed = F.conv_transpose2d(yd, w1)
    flipped = w1.flip(-2, -1)
    wt.matrix("conv_transpose2d(y1, w1)", transposed)
    wt.matrix("conv2d(y1, w1, padding=2)", F.conv2d(yd, w1, padding=2))
    wt.matrix("rot180(w)", flipped)
    wt.matrix("conv2d(y1, rot180(w1), padding=2)", F.conv2d(yd, flipped, padding=2))
    wt.differ("conv_transpose2d(y1, w1) ≠ conv2d(y1, w1, padding=2)", transposed, F.conv2d(yd, w1, padding=2))
    wt.same(
        "conv_transpose2d(y1, w1) = conv2d(y1, rot180(w1), padding=k−1=2): the direct form needs the kernel rotated 180°",
        transposed,
        F.conv2d(yd, flipped, padding=2),
    )
    eq = equivalent_conv2d(yd.shape, w1)
    wt.same("equivalent_conv2d gives that rotated kernel", eq.weight, flipped)
    i_t, k = yd.shape[-1], w.shape[-1]
    wt.claim(
        f"relationship 8 (s=1, p=0): o′ = i′ + (k−1) = {i_t} + {k - 1} = {i_t + k - 1} pixels a side, as conv_transpose2d"
        " and equivalent_conv2d give",
        (i_t + k - 1,) * 2 == eq.output_size == tuple(transposed.shape[-2:]),
    )

    wt.say()
    wt.say("  Cᵀ is the adjoint of C, not its inverse:")
    CCt = C @ C.t()
    wt.matrix("C·Cᵀ", CCt)
    wt.differ("C·Cᵀ ≠ I: conv2d(conv_transpose2d(y)) does not give y back", CCt, torch.eye(4, dtype=DTYPE))
    u = torch.randn(16, generator=gen, dtype=DTYPE)
    v = torch.randn(4, generator=gen, dtype=DTYPE)
    wt.claim(
        "⟨C·u, v⟩ = ⟨u, Cᵀ·v⟩ for random u, v (the definition of the adjoint)",
        torch.isclose(torch.dot(C @ u, v), torch.dot(u, C.t() @ v)),
    )


def _equivalent_lines(wt, eq, s, p, a, d, k):
    wt.say(f"  The equivalent stride-1 convolution (relationship 14 with dilation; groups={eq.groups}):")
    wt.say(
        f"    1. insert s−1 = {eq.zero_insertion[0]} zeros between pixels: "
        f"{eq.input_size[0]} → {eq.stretched_size[0]} pixels a side"
    )
    wt.say(
        f"    2. pad d(k−1)−p = {d}·{k - 1}−{p} = {eq.padding_low[0]} before and d(k−1)−p+a = {eq.padding_high[0]} after"
        + (" (negative: crop)" if min(eq.padding_low + eq.padding_high) < 0 else "")
        + f": {eq.padded_size[0]} pixels a side"
    )
    wt.say(f"    3. rotate the kernel 180°, swap in/out channels per group: {tuple(eq.weight.shape)}")
    wt.say(f"    4. conv2d with stride 1, dilation {eq.dilation[0]}: {eq.output_size[0]} pixels a side")


def strided(wt, gen, kernel, stride, padding, dilation, size):
    """Stride: zero insertion and output_padding (relationships 12-14)."""
    k, s, p, d, i = kernel, stride, padding, dilation, size
    wt.section(f"2. Stride {s}: zero insertion and output_padding (relationships 12–14; k={k}, p={p}, d={d}, i={i})")
    o = _ops.window_count(i, k, s, p, d)
    a = (i + 2 * p - d * (k - 1) - 1) % s
    w = torch.randn(1, 1, k, k, generator=gen, dtype=DTYPE)
    x = torch.randint(-4, 5, (1, 1, i, i), generator=gen).to(DTYPE)
    y = torch.randint(1, 10, (1, 1, o, o), generator=gen).to(DTYPE)
    wt.say(f"  A conv2d with kernel {k}, stride {s}, padding {p}, dilation {d} maps {i}×{i} to")
    wt.say(
        f"  o = ⌊(i + 2p − d(k−1) − 1)/s⌋ + 1 = ⌊({i} + {2 * p} − {d * (k - 1)} − 1)/{s}⌋ + 1"
        f" = {o} pixels a side (relationship 15)."
    )
    wt.claim(f"conv2d output is {o}×{o}", tuple(F.conv2d(x, w, None, s, p, d).shape[-2:]) == (o, o))
    wt.say(f"  The floor drops a = (i + 2p − d(k−1) − 1) mod s = {a} pixel(s): every size from {max(i - a, 1)} to {i - a + s - 1}")
    wt.say(f"  gives {o} windows, so the transposed convolution needs output_padding = a to get back to {i}.")
    wt.claim(f"output_padding_for({o}, {i}, {k}, {s}, {p}, {d}) = {a}", output_padding_for(o, i, k, s, p, d) == a)
    z = F.conv_transpose2d(y, w, None, s, p, a, 1, d)
    try:
        z0 = F.conv_transpose2d(y, w, None, s, p, 0, 1, d)
    except RuntimeError:  # torch rejects a non-positive output size
        z0 = None
    if a and i - a < 1:
        wt.claim(f"without output_padding there is no output at all (F.conv_transpose2d refuses size {i - a})", z0 is None)
    elif a:
        wt.claim(
            f"without output_padding the transposed output is {i - a}×{i - a}, not {i}×{i}",
            tuple(z0.shape[-2:]) == (i - a, i - a),
        )
    else:
        wt.claim(f"a = 0, so the transposed output is already {i}×{i} without output_padding", tuple(z0.shape[-2:]) == (i, i))
    wt.claim(
        f"relationship 14: o′ = s(i′−1) + a + d(k−1) + 1 − 2p = {s}·{o - 1} + {a} + {d * (k - 1) + 1} − {2 * p}"
        f" = {_ops.transposed_size(o, k, s, p, a, d)} = conv_transpose2d's output size",
        _ops.transposed_size(o, k, s, p, a, d) == z.shape[-1] == i,
    )

    eq = equivalent_conv2d(y.shape, w, s, p, a, 1, d)
    wt.say()
    _equivalent_lines(wt, eq, s, p, a, d, k)
    wt.matrix("y", y)
    stretched = eq.stretch(y)
    wt.matrix(f"y with {s - 1} zero(s) inserted between pixels", stretched)
    prepared = eq.pad(stretched)
    wt.matrix(f"… padded by {eq.padding_low[0]} before and {eq.padding_high[0]} after", prepared)
    wt.matrix("w", w)
    wt.matrix("rot180(w)", eq.weight)
    direct = F.conv2d(prepared, eq.weight, None, 1, 0, d)
    wt.matrix(f"conv_transpose2d(y, w, stride={s}, padding={p}, output_padding={a}, dilation={d})", z)
    wt.same("the stride-1 conv2d of the zero-inserted, padded y with rot180(w) gives it", direct, z)
    wt.same("convt_ext.conv_transpose2d_as_conv2d gives it", conv_transpose2d_as_conv2d(y, w, None, s, p, a, 1, d), z)
    wt.same("convt_ext.conv_transpose2d gives it", conv_transpose2d(y, w, None, s, p, a, 1, d), z)
    C = conv_matrix(w, (i, i), s, p, d)
    wt.same(
        f"Cᵀ·y = it, with the {C.shape[0]}×{C.shape[1]} matrix C = conv_matrix(w, ({i}, {i}), {s}, {p}, {d})",
        C.t() @ y.flatten(),
        z.flatten(),
    )
    wt.same("C·x = conv2d(x, w)", C @ x.flatten(), F.conv2d(x, w, None, s, p, d).flatten())
    if s > 1 and o > 1:
        try:
            plain = conv_transpose2d_as_conv2d(y, w, None, 1, p, 0, 1, d)
            got = f"a {_size(plain[0, 0])} output"
        except ValueError:
            plain, got = None, "no output at all"
        wt.claim(
            f"without zero insertion (the stride-1 recipe) y would give {got}, not {i}×{i}",
            plain is None or plain.shape != z.shape,
        )


def dilated_grouped(wt, gen, kernel, stride, padding, dilation, size, groups=2):
    """Dilation and groups (relationship 15), and the backward table."""
    k, s, p, d, i, g = kernel, stride, padding, dilation, size, groups
    c_in, c_out = 2 * g, 3 * g
    wt.section(f"3. Dilation {d} and groups {g} (relationship 15; k={k}, s={s}, p={p}, i={i}, {c_in}→{c_out} channels)")
    o = _ops.window_count(i, k, s, p, d)
    a = (i + 2 * p - d * (k - 1) - 1) % s
    w = torch.randn(c_out, c_in // g, k, k, generator=gen, dtype=DTYPE)
    x = torch.randn(1, c_in, i, i, generator=gen, dtype=DTYPE, requires_grad=True)
    y = torch.randint(1, 10, (1, c_out, o, o), generator=gen).to(DTYPE)
    wt.say(f"  Dilation spreads the kernel's taps d = {d} apart: it covers d(k−1)+1 = {d * (k - 1) + 1} pixels, so")
    wt.say(f"  o = ⌊(i + 2p − k − (k−1)(d−1))/s⌋ + 1 = {o} (relationship 15). conv2d's weight is {_size(w)};")
    wt.say("  the transposed convolution uses the same tensor as its (C_in, C_out/groups, kh, kw) weight.")
    out = F.conv2d(x, w, None, s, p, d, g)
    wt.claim(f"conv2d output is {c_out}×{o}×{o}", tuple(out.shape[1:]) == (c_out, o, o))
    z = F.conv_transpose2d(y, w, None, s, p, a, g, d)
    eq = equivalent_conv2d(y.shape, w, s, p, a, g, d)
    wt.say()
    _equivalent_lines(wt, eq, s, p, a, d, k)
    wt.matrix("channel 0 of y, zero-inserted and padded", eq.prepare(y)[0, 0])
    wt.same("convt_ext.conv_transpose2d_as_conv2d = F.conv_transpose2d", conv_transpose2d_as_conv2d(y, w, None, s, p, a, g, d), z)
    wt.same("convt_ext.conv_transpose2d = F.conv_transpose2d", conv_transpose2d(y, w, None, s, p, a, g, d), z)
    unswapped = w.flip(-2, -1).reshape(eq.weight.shape)
    if z.abs().max() > 0:
        wt.differ(
            "rotating without swapping in/out channels per group (a plain reshape) gives something else",
            F.conv2d(eq.prepare(y), unswapped, None, 1, 0, d, g),
            z,
        )
    else:
        wt.say("  (this geometry's output is all zeros: every tap lands in the cropped padding)")
    C = conv_matrix(w, (i, i), s, p, d, g)
    wt.say(f"  C = conv_matrix(w, ({i}, {i}), {s}, {p}, {d}, groups={g}) is {C.shape[0]}×{C.shape[1]} with {C._nnz()} stored entries.")
    wt.same("C·x = conv2d(x, w)", C @ x.detach().flatten(), out.detach().flatten())
    wt.same("Cᵀ·y = conv_transpose2d(y, w)", C.t() @ y.flatten(), z.flatten())

    wt.say()
    wt.say("  The backward table: each one's input gradient is the other one.")
    (gx,) = torch.autograd.grad(conv2d(x, w, None, s, p, d, g), x, y)
    wt.same("x.grad of convt_ext.conv2d with upstream y = conv_transpose2d(y, w, output_padding=a)", gx, z)
    yy = y.clone().requires_grad_()
    u = torch.randn(z.shape, generator=gen, dtype=DTYPE)
    (gy,) = torch.autograd.grad(conv_transpose2d(yy, w, None, s, p, a, g, d), yy, u)
    wt.same("y.grad of convt_ext.conv_transpose2d with upstream u = conv2d(u, w)", gy, F.conv2d(u, w, None, s, p, d, g))

    if d > s:
        b = s  # allowed because output_padding < max(stride, dilation)
        zb = F.conv_transpose2d(y, w, None, s, p, b, g, d)
        xb = torch.randn(zb.shape[0], c_in, *zb.shape[2:], generator=gen, dtype=DTYPE)
        direct = F.conv2d(xb, w, None, s, p, d, g)
        wt.say()
        wt.say(f"  output_padding may reach max(s, d) − 1 = {d - 1} here, past s − 1 = {s - 1}. With output_padding = {b}")
        wt.say(f"  the output is {zb.shape[-1]} pixels a side, and conv2d over that size has {direct.shape[-1]} windows, not {o}:")
        wt.claim(f"conv2d over the {zb.shape[-1]}-pixel output has more than {o} windows", direct.shape[-1] > o)
        wt.claim(
            "that transposed convolution is the adjoint of conv2d followed by a crop to the first o windows",
            torch.isclose((direct[..., :o, :o] * y).sum(), (xb * zb).sum()),
        )


# ---------------------------------------------------------------- entry points

DEFAULTS = dict(kernel=3, stride=2, padding=1, dilation=None, size=6, seed=0)


def _dilations(dilation):
    """(section 2's dilation, section 3's dilation): 1 and 2 unless given."""
    return (1, 2) if dilation is None else (dilation, dilation)


def geometry_problem(kernel, stride, padding, dilation, size):
    """Why this geometry has no convolution, or None when it is fine."""
    for d in sorted(set(_dilations(dilation))):
        if _ops.window_count(size, kernel, stride, padding, d) < 1:
            return (
                f"--size {size} is too small for --kernel {kernel} with dilation {d} and --padding {padding}: "
                f"need size + 2*padding >= dilation*(kernel-1) + 1 = {d * (kernel - 1) + 1}"
            )
    return None


def run(wt, kernel=3, stride=2, padding=1, dilation=None, size=6, seed=0):
    """All sections into `wt`; returns its claims."""
    problem = geometry_problem(kernel, stride, padding, dilation, size)
    if problem:
        raise ValueError(problem)
    gen = torch.Generator().manual_seed(seed)
    d2, d3 = _dilations(dilation)
    guide_example(wt, gen)
    strided(wt, gen, kernel, stride, padding, d2, size)
    dilated_grouped(wt, gen, kernel, stride, padding, d3, size)
    return wt.claims


def check_claims(kernel=3, stride=2, padding=1, dilation=None, size=6, seed=0):
    """The walk-through's claims, as a list of (claim text, holds), printing
    nothing. `dilation` None means 1 in section 2 and 2 in section 3."""
    return run(Walkthrough(), kernel, stride, padding, dilation, size, seed)


def _bounded(name, low, high):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, but got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} must be between {low} and {high}, but got {value}")
        return value

    return parse


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m convt_ext.explain",
        description="Walk through the transposed convolution (Dumoulin & Visin, sections 4.1-4.3 and 5): "
        "C and its transpose, the kernel flip, zero insertion, output_padding, dilation and groups. "
        "Section 1 is the guide's fixed 4x4 example; the flags choose the geometry of sections 2 and 3. "
        "Exits 0 when every claim holds.",
    )
    parser.add_argument("--kernel", type=_bounded("--kernel", 1, 7), default=DEFAULTS["kernel"], help="kernel size k (default 3)")
    parser.add_argument("--stride", type=_bounded("--stride", 1, 6), default=DEFAULTS["stride"], help="stride s (default 2)")
    parser.add_argument("--padding", type=_bounded("--padding", 0, 8), default=DEFAULTS["padding"], help="padding p (default 1)")
    parser.add_argument(
        "--dilation",
        type=_bounded("--dilation", 1, 6),
        default=DEFAULTS["dilation"],
        help="dilation d (default: 1 in section 2, 2 in section 3)",
    )
    parser.add_argument(
        "--size", type=_bounded("--size", 1, 16), default=DEFAULTS["size"], help="input size i of the direct convolution (default 6)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the random values (default 0)")
    return parser


def _printer(stream):
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "".join(ASCII).encode(encoding)
        fallback = False
    except (UnicodeEncodeError, LookupError):
        fallback = True

    def out(line):
        if fallback:
            for symbol, plain in ASCII.items():
                line = line.replace(symbol, plain)
            line = line.encode("ascii", "replace").decode("ascii")
        print(line, file=stream)

    return out


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = geometry_problem(args.kernel, args.stride, args.padding, args.dilation, args.size)
    if problem:
        parser.error(problem)
    out = _printer(sys.stdout)
    wt = Walkthrough(out)
    claims = run(wt, args.kernel, args.stride, args.padding, args.dilation, args.size, args.seed)
    failed = [text for text, holds in claims if not holds]
    wt.section("Summary")
    wt.say(f"  {len(claims) - len(failed)} of {len(claims)} claims hold.")
    for text in failed:
        wt.say(f"  {BAD} {text}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
