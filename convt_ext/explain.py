"""A runnable walk-through of the transposed convolution.

    python -m convt_ext.explain
    python -m convt_ext.explain --kernel 3 --stride 3 --padding 1 --dilation 2 --size 7
    python -m convt_ext.explain --dims 3
    python -m convt_ext.explain --figures DIR

It answers two questions about the example of "A guide to convolution
arithmetic for deep learning" (Dumoulin & Visin), section 4.1:

1. Why is ``C^T y1`` not ``x1.grad``?  Backpropagation multiplies ``C^T`` by
   the upstream gradient (here a tensor of ones), not by the output ``y1``.
2. Why does ``conv_transpose2d(y1, w)`` differ from ``conv2d(y1, w,
   padding=2)``?  The direct convolution needs the kernel rotated by 180°
   (and, for stride s, s-1 zeros between input pixels, padding d(k-1)-p on
   each side plus output_padding on the high side, and in/out channels
   swapped per group).

Then it goes through stride with zero insertion and output_padding, a
dilated, grouped case, and a depthwise layer (groups = channels: ``C`` is
block-diagonal, each tap a strided view times a diagonal), in the geometry
the flags choose. ``--dims 1`` and
``--dims 3`` make the same claims about conv1d / conv3d (the geometry applies
to every spatial axis; the guide's example becomes 4 → 2 pixels with a
3-tap kernel, or 4×4×4 → 2×2×2 with a 3×3×3 kernel). Every claim is
computed in float64 and marked ✓ when it comes out as the text says (an
equality that holds, or an expected difference) and ✗ when it does not; the
exit status is 0 when every claim holds. :func:`check_claims` returns the
claims for tests.
"""
import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from . import _geometry
from .functional import conv1d, conv2d, conv3d, conv_transpose1d, conv_transpose2d, conv_transpose3d  # noqa: F401
from .matrix import (  # noqa: F401  (looked up by name: see Dims.lib)
    conv_matrix,
    conv_transpose1d_as_conv1d,
    conv_transpose2d_as_conv2d,
    conv_transpose3d_as_conv3d,
    equivalent_conv1d,
    equivalent_conv2d,
    equivalent_conv3d,
    output_padding_for,
)

__all__ = ["Dims", "Walkthrough", "check_claims", "format_matrix", "main"]

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
MAX_SLICED = 128  # 3-d tensors with at most this many entries print slice by slice


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

    def __init__(self, out=None, dims=2):
        self.out = out
        self.dims = dims  # tensors print with their leading size-1 dimensions dropped down to this many
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
        while t.dim() > self.dims and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 3 and t.shape[-1] <= MAX_COLUMNS and t.numel() <= MAX_SLICED:
            self.say(f"  {label} ({_size(t)}), one slice per index of the first axis:")
            for index in range(t.shape[0]):
                self.say(f"    [{index}, :, :]")
                self.say(format_matrix(t[index], **kw))
            return
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


class Dims:
    """The number of spatial dimensions D of a walk-through, and the names and
    shapes that depend on it. Library functions are looked up by name when used
    (``F.conv{D}d``, this module's ``conv_transpose{D}d_as_conv{D}d``, ...), so
    a test that replaces one sees its claims fail."""

    def __init__(self, dims):
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, but got {dims!r}")
        self.n = dims
        self.conv = f"conv{dims}d"
        self.tconv = f"conv_transpose{dims}d"
        self.as_conv = f"conv_transpose{dims}d_as_conv{dims}d"
        self.equivalent = f"equivalent_conv{dims}d"
        # 180° rotation is a 2-d word; in 1-d and 3-d the kernel is reversed along every axis.
        self.flip_name = "rot180" if dims == 2 else "flip"
        self.flip_text = "rotated 180°" if dims == 2 else "reversed along every axis"
        self.side = " a side" if dims > 1 else ""  # "5 pixels a side" (2-d, 3-d), "5 pixels" (1-d)
        self.kernel_names = {1: "k", 2: "kh, kw", 3: "kd, kh, kw"}[dims]

    def F(self, name):
        """torch.nn.functional's `name` (conv / tconv)."""
        return getattr(F, name)

    def lib(self, name):
        """convt_ext's `name`, as this module sees it now."""
        return globals()[name]

    def cube(self, n):
        """'n×n' in 2-d, 'n' in 1-d, 'n×n×n' in 3-d."""
        return "×".join([str(n)] * self.n)

    def pixels(self, n):
        """An image size in words: '5×5' in 2-d, '5×5×5' in 3-d, '5 pixels' in 1-d."""
        return f"{n} pixels" if self.n == 1 else self.cube(n)

    def kernel(self, k):
        """A kernel size in words: '3×3' in 2-d, '3×3×3' in 3-d, '3-tap' in 1-d."""
        return f"{k}-tap" if self.n == 1 else self.cube(k)

    def shape(self, n):
        return (n,) * self.n

    def flip(self, t):
        return t.flip(tuple(range(-self.n, 0)))

    def first(self, t, n):
        """t[..., :n, :n] over the D spatial dimensions."""
        return t[(Ellipsis,) + (slice(n),) * self.n]


def _hand_built_C(w):
    """The guide's matrix for a kernel of 3 per axis over an input of 4 per
    axis (4×16 in 2-d), written out as in its section 4.1: output pixel r
    (one row of C) reads the input pixels r..r+2 along every axis, weighted by
    w; flat indices are row-major. In 2-d: rows (0, 0), (0, 1), (1, 0),
    (1, 1); row (r, c) holds w[ki] at columns (r + ki)·4 + c .. +2."""
    dims = w.dim()
    outputs = list(itertools.product(range(2), repeat=dims))
    C = torch.zeros(len(outputs), 4**dims, dtype=w.dtype)
    for row, out in enumerate(outputs):
        for offset in itertools.product(range(3), repeat=dims):
            column = 0
            for axis in range(dims):
                column = column * 4 + out[axis] + offset[axis]
            C[row, column] = w[offset]
    return C


def _view_is_U(wt, x, dm):
    """One claim: im2col_view's strides are U's nonzero pattern (no padding), so the
    windows need no copy."""
    from .functional import im2col_view
    from .matrix import im2col_matrix

    view = im2col_view(x, dm.shape(3))
    rows, pixels = im2col_matrix(dm.shape(4), dm.shape(3)).coalesce().indices()
    # The storage offset of every (kernel offset, window) element, in U's row order.
    offsets = torch.zeros((), dtype=torch.long)
    for size, stride in zip(view.shape[2:], view.stride()[2:]):
        offsets = offsets[..., None] + torch.arange(size) * stride
    offsets = offsets.flatten() + view.storage_offset() - x.storage_offset()
    wt.say(f"  im2col_view(x1, {dm.cube(3)}) has strides {view.stride()[2:]} (kernel offsets, then windows): x1's, times d and s.")
    wt.claim(
        "im2col_view(x1) copies nothing: its element (j, l) is the pixel where U's row j·L + l has its 1",
        view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        and len(rows) == offsets.numel()
        and torch.equal(offsets[rows], pixels),
    )


def _paths_agree(wt, x, w, s, p, a, d, dm):
    """One claim: the view path (per-tap GEMMs on strided views of channels-last
    memory, no columns) and the column path (im2col + GEMM) compute the same
    convolution and its transpose, in float32 where the view path runs."""
    from . import conv_path, engine_info, set_conv_path

    if not engine_info()["path"]["view_available"]:
        wt.say("  (the view path does not run on this CPU: no comparison of the two paths)")
        return
    x32, w32 = x.float().repeat(1, 16, *([1] * dm.n)), w.float().repeat(16, 16, *([1] * dm.n))
    before, got = conv_path(), {}
    try:
        for path in ("view", "columns"):
            set_conv_path(path)
            calls = engine_info()["path"]["calls"]["view"]
            y = dm.lib(dm.conv)(x32, w32, None, s, p, d)
            z = dm.lib(dm.tconv)(y, w32, None, s, p, a, 1, d)
            got[path] = (y, z, engine_info()["path"]["calls"]["view"] - calls)
    finally:
        set_conv_path(before)
    (yv, zv, ran), (yc, zc, _) = got["view"], got["columns"]
    wt.claim(
        f"the view path ({ran} calls: per-tap GEMMs reading x in place, ld = s·C) and the column path "
        f"(im2col + GEMM) give the same {dm.conv} and {dm.tconv}, to float32 rounding",
        ran == 2 and all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in ((yv, yc), (zv, zc))),
    )


def guide_example(wt, gen, dm=None):
    """Section 4.1's example, its two puzzles and their answers (a 4×4 input
    and a 3×3 kernel in 2-d; 4 and 3 per axis in 1-d and 3-d)."""
    dm = dm or Dims(2)
    conv, tconv, rot = dm.conv, dm.tconv, dm.flip_name
    where = "" if dm.n == 2 else f", in {dm.n}-d"
    wt.section(f"1. The guide's example: convolution as a matrix (section 4.1, relationship 8{where})")
    n_in, n_out = 4**dm.n, 2**dm.n
    x = torch.arange(1, n_in + 1, dtype=DTYPE).reshape(dm.shape(4))
    w = torch.rand(dm.shape(3), generator=gen, dtype=DTYPE)
    x1 = x.view(1, 1, *x.shape).clone().requires_grad_()
    w1 = w.view(1, 1, *w.shape)
    y1 = dm.F(conv)(x1, w1)
    y1.backward(torch.ones_like(y1))
    wt.say(f"  x1 = arange(1, {n_in + 1}) as 1×1×{dm.cube(4)}, w1 = a random {dm.kernel(3)} kernel, y1 = {conv}(x1, w1),")
    wt.say("  y1.backward(ones_like(y1)).")
    wt.matrix("x", x)
    wt.matrix("w", w)
    wt.matrix(f"y1 = {conv}(x1, w1)", y1)

    C = _hand_built_C(w)
    wt.say()
    wt.say(f"  The {n_out}×{n_in} matrix C, built by hand as in the guide (row = output pixel, column = input pixel):")
    wt.matrix("C", C, zero=".")
    wt.same(f"convt_ext.conv_matrix(w1, {dm.shape(4)}).to_dense() is this C", conv_matrix(w1, dm.shape(4)).to_dense(), C)
    wt.same(f"C·x.flatten() = {conv}(x1, w1).flatten()", C @ x.flatten(), y1.detach().flatten())
    _view_is_U(wt, x1.detach(), dm)

    ones = torch.ones(n_out, dtype=DTYPE)
    ct_ones = (C.t() @ ones).view(x.shape)
    ct_y1 = (C.t() @ y1.detach().flatten()).view(x.shape)
    wt.say()
    wt.say("  Puzzle 1: torch.mm(C.t(), y1.view(-1, 1)) is not x1.grad. Why?")
    wt.matrix("x1.grad", x1.grad)
    wt.matrix("Cᵀ·ones", ct_ones)
    wt.matrix("Cᵀ·y1", ct_y1)
    wt.differ("Cᵀ·y1 ≠ x1.grad", ct_y1, x1.grad[0, 0])
    wt.same("x1.grad = Cᵀ·ones: backward multiplies Cᵀ by the upstream gradient (ones here), not by y1", x1.grad[0, 0], ct_ones)
    (grad_by_y1,) = torch.autograd.grad(dm.F(conv)(x1, w1), x1, y1.detach())
    wt.same("with y1 as the upstream gradient, the input gradient is Cᵀ·y1", grad_by_y1[0, 0], ct_y1)
    wt.same(f"Cᵀ·y1 = {tconv}(y1, w1): the transposed convolution is Cᵀ", ct_y1, dm.F(tconv)(y1.detach(), w1)[0, 0])

    wt.say()
    wt.say(f"  Puzzle 2: {tconv}(y1, w1) differs from {conv}(y1, w1, padding=2). Why?")
    yd = y1.detach()
    transposed = dm.F(tconv)(yd, w1)
    flipped = dm.flip(w1)
    wt.matrix(f"{tconv}(y1, w1)", transposed)
    wt.matrix(f"{conv}(y1, w1, padding=2)", dm.F(conv)(yd, w1, padding=2))
    wt.matrix(f"{rot}(w)", flipped)
    wt.matrix(f"{conv}(y1, {rot}(w1), padding=2)", dm.F(conv)(yd, flipped, padding=2))
    wt.differ(f"{tconv}(y1, w1) ≠ {conv}(y1, w1, padding=2)", transposed, dm.F(conv)(yd, w1, padding=2))
    wt.same(
        f"{tconv}(y1, w1) = {conv}(y1, {rot}(w1), padding=k−1=2): the direct form needs the kernel {dm.flip_text}",
        transposed,
        dm.F(conv)(yd, flipped, padding=2),
    )
    eq = dm.lib(dm.equivalent)(yd.shape, w1)
    wt.same(f"{dm.equivalent} gives that {'rotated' if dm.n == 2 else 'reversed'} kernel", eq.weight, flipped)
    i_t, k = yd.shape[-1], w.shape[-1]
    wt.claim(
        f"relationship 8 (s=1, p=0): o′ = i′ + (k−1) = {i_t} + {k - 1} = {i_t + k - 1} pixels{dm.side}, as {tconv}"
        f" and {dm.equivalent} give",
        dm.shape(i_t + k - 1) == eq.output_size == tuple(transposed.shape[2:]),
    )

    wt.say()
    wt.say("  Cᵀ is the adjoint of C, not its inverse:")
    CCt = C @ C.t()
    wt.matrix("C·Cᵀ", CCt)
    wt.differ(f"C·Cᵀ ≠ I: {conv}({tconv}(y)) does not give y back", CCt, torch.eye(n_out, dtype=DTYPE))
    u = torch.randn(n_in, generator=gen, dtype=DTYPE)
    v = torch.randn(n_out, generator=gen, dtype=DTYPE)
    wt.claim(
        "⟨C·u, v⟩ = ⟨u, Cᵀ·v⟩ for random u, v (the definition of the adjoint)",
        torch.isclose(torch.dot(C @ u, v), torch.dot(u, C.t() @ v)),
    )


def _equivalent_lines(wt, eq, s, p, a, d, k, dm=None):
    dm = dm or Dims(2)
    wt.say(f"  The equivalent stride-1 convolution (relationship 14 with dilation; groups={eq.groups}):")
    wt.say(
        f"    1. insert s−1 = {eq.zero_insertion[0]} zeros between pixels: "
        f"{eq.input_size[0]} → {eq.stretched_size[0]} pixels{dm.side}"
    )
    wt.say(
        f"    2. pad d(k−1)−p = {d}·{k - 1}−{p} = {eq.padding_low[0]} before and d(k−1)−p+a = {eq.padding_high[0]} after"
        + (" (negative: crop)" if min(eq.padding_low + eq.padding_high) < 0 else "")
        + f": {eq.padded_size[0]} pixels{dm.side}"
    )
    turn = "rotate the kernel 180°" if dm.n == 2 else "reverse the kernel along every axis"
    wt.say(f"    3. {turn}, swap in/out channels per group: {tuple(eq.weight.shape)}")
    wt.say(f"    4. {dm.conv} with stride 1, dilation {eq.dilation[0]}: {eq.output_size[0]} pixels{dm.side}")


def _dropped(k, s, p, d, i):
    """The pixels relationship 15's floor drops, a = (i + 2p - d(k-1) - 1) mod s:
    the output_padding a transposed convolution needs to get back to i,
    worked out here apart from the library's output_padding_for, which the
    walkthrough checks against it."""
    return (i + 2 * p - d * (k - 1) - 1) % s


def strided(wt, gen, kernel, stride, padding, dilation, size, dm=None):
    """Stride: zero insertion and output_padding (relationships 12-14)."""
    dm = dm or Dims(2)
    conv, tconv, rot = dm.conv, dm.tconv, dm.flip_name
    k, s, p, d, i = kernel, stride, padding, dilation, size
    wt.section(f"2. Stride {s}: zero insertion and output_padding (relationships 12–14; k={k}, p={p}, d={d}, i={i})")
    o = _geometry.window_count(i, k, s, p, d)
    a = _dropped(k, s, p, d, i)
    w = torch.randn(1, 1, *dm.shape(k), generator=gen, dtype=DTYPE)
    x = torch.randint(-4, 5, (1, 1, *dm.shape(i)), generator=gen).to(DTYPE)
    y = torch.randint(1, 10, (1, 1, *dm.shape(o)), generator=gen).to(DTYPE)
    wt.say(f"  A {conv} with kernel {k}, stride {s}, padding {p}, dilation {d} maps {dm.pixels(i)} to")
    wt.say(
        f"  o = ⌊(i + 2p − d(k−1) − 1)/s⌋ + 1 = ⌊({i} + {2 * p} − {d * (k - 1)} − 1)/{s}⌋ + 1"
        f" = {o} pixels{dm.side} (relationship 15)."
    )
    wt.claim(f"{conv} output is {dm.pixels(o)}", tuple(dm.F(conv)(x, w, None, s, p, d).shape[2:]) == dm.shape(o))
    wt.say(f"  The floor drops a = (i + 2p − d(k−1) − 1) mod s = {a} pixel(s): every size from {max(i - a, 1)} to {i - a + s - 1}")
    wt.say(f"  gives {o} windows, so the transposed convolution needs output_padding = a to get back to {i}.")
    wt.claim(f"output_padding_for({o}, {i}, {k}, {s}, {p}, {d}) = {a}", output_padding_for(o, i, k, s, p, d) == a)
    z = dm.F(tconv)(y, w, None, s, p, a, 1, d)
    try:
        z0 = dm.F(tconv)(y, w, None, s, p, 0, 1, d)
    except RuntimeError:  # torch rejects a non-positive output size
        z0 = None
    if a and i - a < 1:
        wt.claim(f"without output_padding there is no output at all (F.{tconv} refuses size {i - a})", z0 is None)
    elif a:
        wt.claim(
            f"without output_padding the transposed output is {dm.pixels(i - a)}, not {dm.pixels(i)}",
            tuple(z0.shape[2:]) == dm.shape(i - a),
        )
    else:
        wt.claim(
            f"a = 0, so the transposed output is already {dm.pixels(i)} without output_padding",
            tuple(z0.shape[2:]) == dm.shape(i),
        )
    wt.claim(
        f"relationship 14: o′ = s(i′−1) + a + d(k−1) + 1 − 2p = {s}·{o - 1} + {a} + {d * (k - 1) + 1} − {2 * p}"
        f" = {_geometry.transposed_size(o, k, s, p, a, d)} = {tconv}'s output size",
        _geometry.transposed_size(o, k, s, p, a, d) == z.shape[-1] == i,
    )

    eq = dm.lib(dm.equivalent)(y.shape, w, s, p, a, 1, d)
    wt.say()
    _equivalent_lines(wt, eq, s, p, a, d, k, dm)
    wt.matrix("y", y)
    stretched = eq.stretch(y)
    wt.matrix(f"y with {s - 1} zero(s) inserted between pixels", stretched)
    prepared = eq.pad(stretched)
    wt.matrix(f"… padded by {eq.padding_low[0]} before and {eq.padding_high[0]} after", prepared)
    wt.matrix("w", w)
    wt.matrix(f"{rot}(w)", eq.weight)
    direct = dm.F(conv)(prepared, eq.weight, None, 1, 0, d)
    wt.matrix(f"{tconv}(y, w, stride={s}, padding={p}, output_padding={a}, dilation={d})", z)
    wt.same(f"the stride-1 {conv} of the zero-inserted, padded y with {rot}(w) gives it", direct, z)
    wt.same(f"convt_ext.{dm.as_conv} gives it", dm.lib(dm.as_conv)(y, w, None, s, p, a, 1, d), z)
    wt.same(f"convt_ext.{tconv} gives it", dm.lib(tconv)(y, w, None, s, p, a, 1, d), z)
    C = conv_matrix(w, dm.shape(i), s, p, d)
    wt.same(
        f"Cᵀ·y = it, with the {C.shape[0]}×{C.shape[1]} matrix C = conv_matrix(w, {dm.shape(i)}, {s}, {p}, {d})",
        C.t() @ y.flatten(),
        z.flatten(),
    )
    wt.same(f"C·x = {conv}(x, w)", C @ x.flatten(), dm.F(conv)(x, w, None, s, p, d).flatten())
    _paths_agree(wt, x, w, s, p, a, d, dm)
    if s > 1 and o > 1:
        try:
            plain = dm.lib(dm.as_conv)(y, w, None, 1, p, 0, 1, d)
            got = f"a {_size(plain[0, 0])} output"
        except ValueError:
            plain, got = None, "no output at all"
        wt.claim(
            f"without zero insertion (the stride-1 recipe) y would give {got}, not {dm.pixels(i)}",
            plain is None or plain.shape != z.shape,
        )


def dilated_grouped(wt, gen, kernel, stride, padding, dilation, size, groups=2, dm=None):
    """Dilation and groups (relationship 15), and the backward table."""
    dm = dm or Dims(2)
    conv, tconv = dm.conv, dm.tconv
    k, s, p, d, i, g = kernel, stride, padding, dilation, size, groups
    c_in, c_out = 2 * g, 3 * g
    wt.section(f"3. Dilation {d} and groups {g} (relationship 15; k={k}, s={s}, p={p}, i={i}, {c_in}→{c_out} channels)")
    o = _geometry.window_count(i, k, s, p, d)
    a = _dropped(k, s, p, d, i)
    w = torch.randn(c_out, c_in // g, *dm.shape(k), generator=gen, dtype=DTYPE)
    x = torch.randn(1, c_in, *dm.shape(i), generator=gen, dtype=DTYPE, requires_grad=True)
    y = torch.randint(1, 10, (1, c_out, *dm.shape(o)), generator=gen).to(DTYPE)
    wt.say(f"  Dilation spreads the kernel's taps d = {d} apart: it covers d(k−1)+1 = {d * (k - 1) + 1} pixels, so")
    wt.say(f"  o = ⌊(i + 2p − k − (k−1)(d−1))/s⌋ + 1 = {o} (relationship 15). {conv}'s weight is {_size(w)};")
    wt.say(f"  the transposed convolution uses the same tensor as its (C_in, C_out/groups, {dm.kernel_names}) weight.")
    out = dm.F(conv)(x, w, None, s, p, d, g)
    wt.claim(f"{conv} output is {c_out}×{dm.cube(o)}", tuple(out.shape[1:]) == (c_out, *dm.shape(o)))
    z = dm.F(tconv)(y, w, None, s, p, a, g, d)
    eq = dm.lib(dm.equivalent)(y.shape, w, s, p, a, g, d)
    wt.say()
    _equivalent_lines(wt, eq, s, p, a, d, k, dm)
    wt.matrix("channel 0 of y, zero-inserted and padded", eq.prepare(y)[0, 0])
    wt.same(f"convt_ext.{dm.as_conv} = F.{tconv}", dm.lib(dm.as_conv)(y, w, None, s, p, a, g, d), z)
    wt.same(f"convt_ext.{tconv} = F.{tconv}", dm.lib(tconv)(y, w, None, s, p, a, g, d), z)
    unswapped = dm.flip(w).reshape(eq.weight.shape)
    if z.abs().max() > 0:
        wt.differ(
            "rotating without swapping in/out channels per group (a plain reshape) gives something else"
            if dm.n == 2
            else "reversing without swapping in/out channels per group (a plain reshape) gives something else",
            dm.F(conv)(eq.prepare(y), unswapped, None, 1, 0, d, g),
            z,
        )
    else:
        wt.say("  (this geometry's output is all zeros: every tap lands in the cropped padding)")
    C = conv_matrix(w, dm.shape(i), s, p, d, g)
    wt.say(f"  C = conv_matrix(w, {dm.shape(i)}, {s}, {p}, {d}, groups={g}) is {C.shape[0]}×{C.shape[1]} with {C._nnz()} stored entries.")
    wt.same(f"C·x = {conv}(x, w)", C @ x.detach().flatten(), out.detach().flatten())
    wt.same(f"Cᵀ·y = {tconv}(y, w)", C.t() @ y.flatten(), z.flatten())

    wt.say()
    wt.say("  The backward table: each one's input gradient is the other one.")
    (gx,) = torch.autograd.grad(dm.lib(conv)(x, w, None, s, p, d, g), x, y)
    wt.same(f"x.grad of convt_ext.{conv} with upstream y = {tconv}(y, w, output_padding=a)", gx, z)
    yy = y.clone().requires_grad_()
    u = torch.randn(z.shape, generator=gen, dtype=DTYPE)
    (gy,) = torch.autograd.grad(dm.lib(tconv)(yy, w, None, s, p, a, g, d), yy, u)
    wt.same(f"y.grad of convt_ext.{tconv} with upstream u = {conv}(u, w)", gy, dm.F(conv)(u, w, None, s, p, d, g))

    if d > s:
        b = s  # allowed because output_padding < max(stride, dilation)
        zb = dm.F(tconv)(y, w, None, s, p, b, g, d)
        xb = torch.randn(zb.shape[0], c_in, *zb.shape[2:], generator=gen, dtype=DTYPE)
        direct = dm.F(conv)(xb, w, None, s, p, d, g)
        wt.say()
        wt.say(f"  output_padding may reach max(s, d) − 1 = {d - 1} here, past s − 1 = {s - 1}. With output_padding = {b}")
        wt.say(
            f"  the output is {zb.shape[-1]} pixels{dm.side}, and {conv} over that size has {direct.shape[-1]} windows,"
            f" not {o}:"
        )
        wt.claim(f"{conv} over the {zb.shape[-1]}-pixel output has more than {o} windows", direct.shape[-1] > o)
        wt.claim(
            f"that transposed convolution is the adjoint of {conv} followed by a crop to the first o windows",
            torch.isclose((dm.first(direct, o) * y).sum(), (xb * zb).sum()),
        )


def depthwise(wt, gen, kernel, stride, padding, dilation, size, channels=3, dm=None):
    """A depthwise layer (groups = C_in = C_out): C is block-diagonal over
    channels, and the depthwise path is im2col's view times a diagonal (Note
    [Depthwise as a diagonal] in csrc/depthwise_elements.h)."""
    from . import conv_path, engine_info, set_conv_path
    from .functional import im2col_view

    dm = dm or Dims(2)
    conv, tconv = dm.conv, dm.tconv
    k, s, p, d, i, n = kernel, stride, padding, dilation, size, channels
    wt.section(f"4. Depthwise: C is block-diagonal, a view times a diagonal (groups = {n}; k={k}, s={s}, p={p}, d={d}, i={i})")
    o = _geometry.window_count(i, k, s, p, d)
    a = _dropped(k, s, p, d, i)
    w = torch.randn(n, 1, *dm.shape(k), generator=gen, dtype=DTYPE)
    x = torch.randn(1, n, *dm.shape(i), generator=gen, dtype=DTYPE)
    y = torch.randint(1, 10, (1, n, *dm.shape(o)), generator=gen).to(DTYPE)
    L, N = o**dm.n, i**dm.n
    wt.say(f"  Depthwise: groups = C_in = C_out = {n}, weight {_size(w)}. Each channel has its own kernel,")
    wt.say("  and each output channel reads only its own input channel.")
    C = conv_matrix(w, dm.shape(i), s, p, d, n).coalesce()
    rows, cols = C.indices()
    counts = torch.zeros(n, n, dtype=DTYPE).index_put_((rows // L, cols // N), torch.ones(rows.numel(), dtype=DTYPE), accumulate=True)
    wt.say(f"  C = conv_matrix(w, {dm.shape(i)}, {s}, {p}, {d}, groups={n}) is {C.shape[0]}×{C.shape[1]}: {n}×{n} blocks of {L}×{N}.")
    wt.matrix("nonzeros per block (output channel, input channel)", counts)
    wt.claim(f"C is block-diagonal: none of its {C._nnz()} nonzeros couples two channels", bool(torch.all(rows // L == cols // N)))
    own = True
    for c in range(n):
        inside = (rows // L == c) & (cols // N == c)
        block = torch.sparse_coo_tensor(torch.stack((rows[inside] - c * L, cols[inside] - c * N)), C.values()[inside], (L, N), check_invariants=True)
        single = conv_matrix(w[c:c + 1], dm.shape(i), s, p, d)
        own = own and single.shape == block.shape and bool(torch.all((block - single).coalesce().values().abs() <= 1e-10))
    wt.claim(f"its diagonal block c is conv_matrix(w[c:c+1]), channel c's own single-channel {L}×{N} matrix", own)
    wt.say("  So no GEMM is left: each channel's output is its own column block times one row of taps.")

    # The depthwise path, forced, on x (planar) and on x in channels-last memory.
    last = x.movedim(1, -1).contiguous()  # (N, *spatial, C) in memory
    x_last = last.movedim(-1, 1)  # the same x, channels-last strides
    before = conv_path()
    try:
        set_conv_path("depthwise")
        calls = engine_info()["path"]["calls"]["depthwise"]
        out = dm.lib(conv)(x, w, None, s, p, d, n)
        back = dm.lib(tconv)(y, w, None, s, p, a, n, d)
        out_last = dm.lib(conv)(x_last, w, None, s, p, d, n)
        ran = engine_info()["path"]["calls"]["depthwise"] - calls
    finally:
        set_conv_path(before)
    wt.say()
    wt.say(f"  Forced onto the depthwise path ({ran} calls: a sum over taps per output element, no GEMM), in float64:")
    wt.claim(f"convt_ext.{conv} on the depthwise path = C·x", ran == 3 and _same(out.flatten(), C @ x.flatten()))
    wt.claim(
        f"convt_ext.{tconv} on the depthwise path = Cᵀ·y: col2im's gather, channel by channel",
        ran == 3 and _same(back.flatten(), C.t() @ y.flatten()),
    )

    # im2col as a view, times a diagonal.
    padded = F.pad(last, (0, 0) + (p, p) * dm.n).movedim(-1, 1)  # channels-last, padded once: im2col_view has no padding
    view = im2col_view(padded, dm.shape(k), d, s)  # (1, C, *k, *windows)
    strides = tuple(s * padded.stride(2 + axis) for axis in range(dm.n))
    total, shared = torch.zeros(1, *dm.shape(o), n, dtype=DTYPE), True
    for tap in itertools.product(range(k), repeat=dm.n):
        block = view[(slice(None), slice(None)) + tap]  # (1, C, *windows): tap's column block
        shared = shared and block.untyped_storage().data_ptr() == padded.untyped_storage().data_ptr()
        shared = shared and block.stride(1) == 1 and block.stride()[2:] == strides
        diagonal = torch.diag(w[(slice(None), 0) + tap])  # C×C: each channel times its own tap weight
        total += block.movedim(1, -1) @ diagonal
    wt.say(f"  In channels-last memory (padded once), tap j's column block is a strided view of x: {L} windows")
    wt.say(f"  of C = {n} consecutive channels, window strides {strides} (s·C = {s * n} on the last axis).")
    wt.say("  Depthwise multiplies that view by a diagonal: each channel by its own weight at tap j.")
    wt.claim("every tap's block of im2col_view(x) copies nothing: channels at stride 1, windows s·(x's strides) apart", shared)
    wt.claim(
        f"the sum over the {k**dm.n} taps of view_j·diag(w[:, 0, j]) is {conv} on the depthwise path (channels-last x)",
        ran == 3 and _same(total.movedim(-1, 1), out_last),
    )


# ---------------------------------------------------------------- entry points

DEFAULTS = dict(kernel=3, stride=2, padding=1, dilation=None, size=6, seed=0, dims=2)


def _dilations(dilation):
    """(section 2's dilation, section 3's dilation): 1 and 2 unless given."""
    return (1, 2) if dilation is None else (dilation, dilation)


def geometry_problem(kernel, stride, padding, dilation, size):
    """Why this geometry has no convolution, or None when it is fine."""
    for d in sorted(set(_dilations(dilation))):
        if _geometry.window_count(size, kernel, stride, padding, d) < 1:
            return (
                f"--size {size} is too small for --kernel {kernel} with dilation {d} and --padding {padding}: "
                f"need size + 2*padding >= dilation*(kernel-1) + 1 = {d * (kernel - 1) + 1}"
            )
    return None


def run(wt, kernel=3, stride=2, padding=1, dilation=None, size=6, seed=0, dims=2):
    """All sections into `wt`, with `dims` (1, 2 or 3) spatial dimensions and
    the geometry on every axis; returns its claims."""
    dm = Dims(dims)
    problem = geometry_problem(kernel, stride, padding, dilation, size)
    if problem:
        raise ValueError(problem)
    wt.dims = dims
    gen = torch.Generator().manual_seed(seed)
    d2, d3 = _dilations(dilation)
    guide_example(wt, gen, dm)
    strided(wt, gen, kernel, stride, padding, d2, size, dm)
    dilated_grouped(wt, gen, kernel, stride, padding, d3, size, dm=dm)
    depthwise(wt, gen, kernel, stride, padding, d2, size, dm=dm)
    return wt.claims


def check_claims(kernel=3, stride=2, padding=1, dilation=None, size=6, seed=0, dims=2):
    """The walk-through's claims, as a list of (claim text, holds), printing
    nothing. `dilation` None means 1 in section 2 and 2 in section 3; `dims`
    is the number of spatial dimensions (1, 2 or 3)."""
    return run(Walkthrough(), kernel, stride, padding, dilation, size, seed, dims)


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
        "--dims 1 or 3 makes the same claims about conv1d or conv3d (the geometry then applies to every axis). "
        "Exits 0 when every claim holds.",
    )
    parser.add_argument(
        "--dims", type=_bounded("--dims", 1, 3), default=DEFAULTS["dims"], help="number of spatial dimensions: 1, 2 or 3 (default 2)"
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
    parser.add_argument(
        "--figures",
        metavar="DIR",
        help="instead, draw the guide's figures from the matrices into DIR (PNGs and index.html; needs matplotlib)",
    )
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
    if args.figures is not None:
        from . import figures

        return figures.main(args.figures, _printer(sys.stdout))
    problem = geometry_problem(args.kernel, args.stride, args.padding, args.dilation, args.size)
    if problem:
        parser.error(problem)
    out = _printer(sys.stdout)
    wt = Walkthrough(out)
    claims = run(wt, args.kernel, args.stride, args.padding, args.dilation, args.size, args.seed, args.dims)
    failed = [text for text, holds in claims if not holds]
    wt.section("Summary")
    wt.say(f"  {len(claims) - len(failed)} of {len(claims)} claims hold.")
    for text in failed:
        wt.say(f"  {BAD} {text}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
