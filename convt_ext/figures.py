"""The figures of "A guide to convolution arithmetic for deep learning"
(Dumoulin & Visin), drawn from the matrices that convt_ext computes.

    python -m convt_ext.explain --figures DIR

writes one PNG per figure and ``DIR/index.html``, each figure with the one-line
relationship it illustrates. Three layers, so that every figure can be
checked without drawing it:

1. data (:func:`direct_figure`, :func:`transposed_figure`,
   :func:`example_figure`, :func:`view_figure`, :func:`depthwise_figure`):
   what each figure shows, read
   off the nonzeros of :func:`~convt_ext.im2col_matrix` (``U``) and
   :func:`~convt_ext.conv_matrix` (``C``) for the figure's exact arguments, and
   for the transposed figures off the guide's recipe
   (:func:`~convt_ext.equivalent_conv2d` and its 1-d/3-d forms). No geometry
   is coded here a second time: the cells marked for output position ``j``
   are the nonzeros of ``U``'s rows for ``j``.
2. scenes (:func:`scene`): the figure as grids of cell kinds and texts, in
   cell units; also matplotlib-free, so tests can read what a figure marks.
3. painting (:func:`paint`): matplotlib's Agg canvas, imported only there.

The guide's arguments live in :data:`FIGURES`, which the tests share.
"""
import html
import math
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Tuple

import torch

from . import _geometry
from .matrix import conv_matrix, equivalent_conv1d, equivalent_conv2d, equivalent_conv3d, im2col_matrix

__all__ = [
    "DEPTHWISE",
    "FIGURES",
    "Geometry",
    "SPECS",
    "depthwise_figure",
    "direct_figure",
    "example_figure",
    "figure_names",
    "paint",
    "scene",
    "transposed_figure",
    "view_figure",
    "write_figures",
]


class Geometry(NamedTuple):
    """One direct convolution of the guide: ``title`` starts with its figure
    numbers ("2.1/4.1": the direct figure and its transpose), then
    ``(i, k, s, p, d)`` and ``o``, the output size the guide prints."""

    title: str
    i: int
    k: int
    s: int
    p: int
    d: int
    o: int

    @property
    def numbers(self):
        """The guide's figure numbers: ('2.1', '4.1'), or ('5.1',)."""
        return tuple(self.title.split()[0].split("/"))

    @property
    def words(self):
        """The title without its numbers: 'no padding, unit strides'."""
        return self.title.split(" ", 1)[1]


# The direct convolutions of chapter 2 (and 5.1), whose transposes are figures
# 4.1-4.7, with o as printed in the guide.
FIGURES = [
    Geometry("2.1/4.1 no padding, unit strides", 4, 3, 1, 0, 1, 2),
    Geometry("2.2/4.2 arbitrary padding, unit strides", 5, 4, 1, 2, 1, 6),
    Geometry("2.3/4.3 half padding, unit strides", 5, 3, 1, 1, 1, 5),
    Geometry("2.4/4.4 full padding, unit strides", 5, 3, 1, 2, 1, 7),
    Geometry("2.5/4.5 no padding, strides", 5, 3, 2, 0, 1, 2),
    Geometry("2.6/4.6 padding, strides", 5, 3, 2, 1, 1, 3),
    Geometry("2.7/4.7 padding, strides (odd)", 6, 3, 2, 1, 1, 3),
    Geometry("5.1 dilation", 7, 3, 1, 0, 2, 3),
]

# The relationship each figure illustrates: (number, formula) for the direct
# figures, (number, formula, the equivalent direct convolution) for their
# transposes, as the guide writes them.
_DIRECT_RELATIONSHIP = {
    "2.1": ("1", "o = (i − k) + 1"),
    "2.2": ("2", "o = (i − k) + 2p + 1"),
    "2.3": ("3 (half padding, p = ⌊k/2⌋)", "o = i"),
    "2.4": ("4 (full padding, p = k − 1)", "o = i + (k − 1)"),
    "2.5": ("5", "o = ⌊(i − k)/s⌋ + 1"),
    "2.6": ("6", "o = ⌊(i + 2p − k)/s⌋ + 1"),
    "2.7": ("6", "o = ⌊(i + 2p − k)/s⌋ + 1"),
    "5.1": ("15", "o = ⌊(i + 2p − k − (k − 1)(d − 1))/s⌋ + 1"),
}
_TRANSPOSED_RELATIONSHIP = {
    "4.1": ("8", "o′ = i′ + (k − 1)", "p′ = k − 1"),
    "4.2": ("9", "o′ = i′ + (k − 1) − 2p", "p′ = k − p − 1"),
    "4.3": ("10", "o′ = i′", "p′ = p"),
    "4.4": ("11", "o′ = i′ − (k − 1)", "p′ = 0"),
    "4.5": ("12", "o′ = s(i′ − 1) + k", "p′ = k − 1"),
    "4.6": ("13", "o′ = s(i′ − 1) + k − 2p", "p′ = k − p − 1"),
    "4.7": ("14", "o′ = s(i′ − 1) + a + k − 2p", "p′ = k − p − 1"),
}

_EQUIVALENT = {1: equivalent_conv1d, 2: equivalent_conv2d, 3: equivalent_conv3d}
DTYPE = torch.float64


def geometry(number):
    """The row of :data:`FIGURES` for a figure number ('2.6', '4.6', '5.1')."""
    for g in FIGURES:
        if number in g.numbers:
            return g
    raise KeyError(f"the guide has no figure {number!r} in FIGURES")


# ---------------------------------------------------------------- 1. data, from the matrices


def _unravel(flat, shape):
    out = []
    for n in reversed(shape):
        out.append(flat % n)
        flat //= n
    return tuple(reversed(out))


def _ravel(index, shape):
    flat = 0
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat


def _by_position(U, taps):
    """U's nonzeros grouped by window position: for each position l, the
    (tap, column) pairs of U's rows tap·L + l, in tap order."""
    L = U.shape[0] // taps
    rows, cols = U.coalesce().indices().tolist()
    out = [[] for _ in range(L)]
    for row, col in zip(rows, cols):
        out[row % L].append((row // L, col))
    return [tuple(sorted(pairs)) for pairs in out]


@dataclass(frozen=True)
class DirectFigure:
    """A direct convolution as the guide draws it (figures 2.1-2.7, 5.1):
    the input inside its zero padding (``grid_size``), and per output
    position the cells the kernel covers.

    ``shadow[l]``: the cells of the padded grid under the kernel at output
    position ``l``, in tap order: the nonzeros of ``U``'s rows for ``l``, with
    ``U`` the im2col matrix of the same windows over the explicitly padded
    grid (padding 0). ``taps[l]``: the ``(tap, input pixel)`` pairs that read
    the input: the nonzeros of ``U``'s rows for ``l``, with ``U =
    im2col_matrix(input_size, k, d, p, s)``. Flat indices are row-major."""

    geometry: Geometry
    dims: int
    input_size: Tuple[int, ...]
    padding: Tuple[int, ...]
    grid_size: Tuple[int, ...]
    output_size: Tuple[int, ...]
    shadow: Tuple[Tuple[int, ...], ...]
    taps: Tuple[Tuple[Tuple[int, int], ...], ...]

    def grid_cell(self, pixel):
        """The padded grid's flat cell of input pixel `pixel` (flat)."""
        index = _unravel(pixel, self.input_size)
        return _ravel([i + p for i, p in zip(index, self.padding)], self.grid_size)

    def is_input(self, cell):
        """Whether a cell of the padded grid lies in the input (not the padding)."""
        index = _unravel(cell, self.grid_size)
        return all(p <= i < p + n for i, p, n in zip(index, self.padding, self.input_size))


def direct_figure(g, dims=2):
    """The data of a direct figure for geometry `g` in `dims` dimensions."""
    size, padding = (g.i,) * dims, (g.p,) * dims
    grid = tuple(n + 2 * p for n, p in zip(size, padding))
    taps = g.k**dims
    U = im2col_matrix(size, g.k, g.d, g.p, g.s)
    U_padded = im2col_matrix(grid, g.k, g.d, 0, g.s)
    shadow = [tuple(cell for _, cell in pairs) for pairs in _by_position(U_padded, taps)]
    return DirectFigure(
        geometry=g,
        dims=dims,
        input_size=size,
        padding=padding,
        grid_size=grid,
        output_size=tuple(_geometry.windows(size, (g.k,) * dims, (g.s,) * dims, padding, (g.d,) * dims)),
        shadow=tuple(shadow),
        taps=tuple(_by_position(U, taps)),
    )


@dataclass(frozen=True)
class TransposedFigure:
    """A transposed convolution two ways (figures 4.1-4.7): the guide's
    picture, a stride-1 direct convolution with the kernel reversed sliding
    over the zero-inserted, padded input; and ``Cᵀ`` applied to that input.

    The kernel is ``w`` with entries 1..K (its taps' labels). ``grid``: the
    image the direct convolution reads, ``equivalent_conv*d(...).prepare`` of
    the input's pixel numbers 1..n (0 for a zero); ``inside``: 1 where a grid
    cell comes from the zero-inserted input (a pixel or an inserted zero), 0
    in the padding. ``recipe[n]``: for output pixel ``n``, the ``(label, input
    pixel)`` pairs of the window that land on an input pixel (the window's
    cells are ``window[n]``, the nonzeros of the stride-1 ``U`` over the grid,
    and ``label`` the reversed kernel's entry at that tap).
    ``transposed[n]``: the nonzeros ``(C[l, n], l)`` of row ``n`` of ``Cᵀ``,
    ``C = conv_matrix(w, o′, s, p, d)``. The figure's point:
    ``recipe[n] == transposed[n]``."""

    geometry: Geometry
    dims: int
    input_size: Tuple[int, ...]
    output_padding: Tuple[int, ...]
    output_size: Tuple[int, ...]
    grid_size: Tuple[int, ...]
    padding_low: Tuple[int, ...]
    padding_high: Tuple[int, ...]
    grid: Tuple[int, ...]
    inside: Tuple[int, ...]
    kernel: Tuple[int, ...]
    reversed_kernel: Tuple[int, ...]
    window: Tuple[Tuple[int, ...], ...]
    recipe: Tuple[Tuple[Tuple[int, int], ...], ...]
    transposed: Tuple[Tuple[Tuple[int, int], ...], ...]
    matrix: torch.Tensor = field(repr=False)  # Cᵀ, dense, entries = labels


def transposed_figure(g, dims=2):
    """The data of the transposed figure (4.x) for geometry `g`: the
    transposed convolution of an o-pixel input back to i pixels."""
    from .matrix import output_padding_for

    i_t, o_t = (g.o,) * dims, (g.i,) * dims
    a = output_padding_for(i_t, o_t, g.k, g.s, g.p, g.d)
    K = g.k**dims
    w = torch.arange(1, K + 1, dtype=DTYPE).reshape(1, 1, *(g.k,) * dims)
    eq = _EQUIVALENT[dims](i_t, w, g.s, g.p, a, 1, g.d)
    numbers = torch.arange(1, math.prod(i_t) + 1, dtype=DTYPE).reshape(1, 1, *i_t)
    grid = eq.prepare(numbers).flatten().long().tolist()
    inside = eq.pad(torch.ones(1, 1, *eq.stretched_size, dtype=DTYPE)).flatten().long().tolist()
    reversed_kernel = eq.weight.flatten().long().tolist()
    U = im2col_matrix(eq.padded_size, g.k, g.d, 0, 1)
    window, recipe = [], []
    for pairs in _by_position(U, K):
        window.append(tuple(cell for _, cell in pairs))
        recipe.append(tuple(sorted((reversed_kernel[t], grid[cell] - 1) for t, cell in pairs if grid[cell])))
    Ct = conv_matrix(w, o_t, g.s, g.p, g.d).to_dense().t()
    transposed = [tuple(sorted((int(Ct[n, l]), l) for l in Ct[n].nonzero().flatten().tolist())) for n in range(Ct.shape[0])]
    return TransposedFigure(
        geometry=g,
        dims=dims,
        input_size=i_t,
        output_padding=tuple(a),
        output_size=tuple(eq.output_size),
        grid_size=tuple(eq.padded_size),
        padding_low=tuple(eq.padding_low),
        padding_high=tuple(eq.padding_high),
        grid=tuple(grid),
        inside=tuple(inside),
        kernel=tuple(w.flatten().long().tolist()),
        reversed_kernel=tuple(reversed_kernel),
        window=tuple(window),
        recipe=tuple(recipe),
        transposed=tuple(transposed),
        matrix=Ct,
    )


@dataclass(frozen=True)
class ExampleFigure:
    """The guide's worked example (section 4.1: a 4×4 input, a 3×3 kernel):
    ``C`` with the kernel's labels 1..9 placed (``conv_matrix``) and ``U``
    (``im2col_matrix``), both dense."""

    C: torch.Tensor = field(repr=False)
    U: torch.Tensor = field(repr=False)
    kernel_size: int = 3
    input_size: int = 4


def example_figure():
    w = torch.arange(1, 10, dtype=DTYPE).reshape(1, 1, 3, 3)
    return ExampleFigure(C=conv_matrix(w, (4, 4)).to_dense(), U=im2col_matrix((4, 4), 3).to_dense())


@dataclass(frozen=True)
class ViewFigure:
    """im2col as a view of a channels-last (NHWC) image: the column block of
    kernel tap ``tap`` for output row ``row`` is ``M`` rows of ``channels``
    consecutive elements, the pixels ``pixels`` (the nonzeros of ``U``'s rows
    tap·L + row·OW + m), row m starting at element ``offsets[m] =
    pixels[m]·channels``; consecutive rows lie ``ld`` elements apart."""

    input_size: Tuple[int, int]
    channels: int
    kernel_size: int
    stride: int
    padding: int
    tap: Tuple[int, int]
    row: int
    output_size: Tuple[int, int]
    pixels: Tuple[int, ...]
    offsets: Tuple[int, ...]

    @property
    def ld(self):
        steps = {b - a for a, b in zip(self.offsets, self.offsets[1:])}
        return steps.pop() if len(steps) == 1 else None


VIEW = dict(input_size=(5, 7), channels=3, kernel_size=3, stride=2, padding=0, tap=(1, 2), row=1)


def view_figure(input_size=VIEW["input_size"], channels=VIEW["channels"], kernel_size=VIEW["kernel_size"],
                stride=VIEW["stride"], padding=VIEW["padding"], tap=VIEW["tap"], row=VIEW["row"]):  # fmt: skip
    k = kernel_size
    U = im2col_matrix(input_size, k, 1, padding, stride)
    windows = tuple(_geometry.windows(input_size, (k, k), (stride,) * 2, (padding,) * 2, (1, 1)))
    t = tap[0] * k + tap[1]
    by_position = _by_position(U, k * k)
    pixels = []
    for m in range(windows[1]):
        pixels += [pixel for j, pixel in by_position[row * windows[1] + m] if j == t]  # none in the padding
    return ViewFigure(
        input_size=tuple(input_size),
        channels=channels,
        kernel_size=k,
        stride=stride,
        padding=padding,
        tap=tuple(tap),
        row=row,
        output_size=windows,
        pixels=tuple(pixels),
        offsets=tuple(p * channels for p in pixels),
    )


@dataclass(frozen=True)
class DepthwiseFigure:
    """A depthwise layer (groups = C_in = C_out = ``channels``, one tap row
    per channel): ``C = conv_matrix(w, input_size, stride, padding,
    groups=channels)``, dense, and ``own[c] = conv_matrix(w[c:c+1], ...)``,
    channel ``c``'s single-channel matrix. Channel ``c``'s kernel holds the
    labels ``c·K + 1 .. c·K + K`` (``K`` taps), so an entry of ``C`` names
    its channel and its tap. The figure's point: ``C`` is zero off the
    diagonal blocks (``off_diagonal == 0``), and ``block(c, c) == own[c]``."""

    channels: int
    input_size: Tuple[int, int]
    kernel_size: int
    stride: int
    padding: int
    output_size: Tuple[int, int]
    C: torch.Tensor = field(repr=False)
    own: Tuple[torch.Tensor, ...] = field(repr=False)

    @property
    def taps(self):
        return self.kernel_size**2

    @property
    def block_shape(self):
        """(L, N): one channel's output pixels by its input pixels."""
        return math.prod(self.output_size), math.prod(self.input_size)

    def block(self, a, b):
        """The block of ``C`` from input channel ``b`` to output channel ``a``."""
        L, N = self.block_shape
        return self.C[a * L:(a + 1) * L, b * N:(b + 1) * N]

    def channel_and_tap(self, label):
        """An entry of ``C`` as (channel, tap): label c·K + t + 1."""
        return (int(label) - 1) // self.taps, (int(label) - 1) % self.taps

    @property
    def off_diagonal(self):
        """How many nonzeros of ``C`` couple two different channels."""
        n = self.channels
        return sum(int(self.block(a, b).count_nonzero()) for a in range(n) for b in range(n) if a != b)

    @property
    def own_blocks(self):
        """Whether every diagonal block is its channel's single-channel matrix."""
        return all(torch.equal(self.block(c, c), self.own[c]) for c in range(self.channels))


DEPTHWISE = dict(channels=3, input_size=(4, 4), kernel_size=3, stride=1, padding=1)


def depthwise_figure(channels=DEPTHWISE["channels"], input_size=DEPTHWISE["input_size"],
                     kernel_size=DEPTHWISE["kernel_size"], stride=DEPTHWISE["stride"], padding=DEPTHWISE["padding"]):  # fmt: skip
    k, K = kernel_size, kernel_size**2
    w = torch.arange(1, channels * K + 1, dtype=DTYPE).reshape(channels, 1, k, k)
    C = conv_matrix(w, input_size, stride, padding, 1, channels).to_dense()
    own = tuple(conv_matrix(w[c:c + 1], input_size, stride, padding).to_dense() for c in range(channels))
    return DepthwiseFigure(
        channels=channels,
        input_size=tuple(input_size),
        kernel_size=k,
        stride=stride,
        padding=padding,
        output_size=tuple(_geometry.windows(input_size, (k, k), (stride,) * 2, (padding,) * 2, (1, 1))),
        C=C,
        own=own,
    )


# ---------------------------------------------------------------- the figure list


@dataclass(frozen=True)
class Spec:
    """One figure: its file name (``name``.png), heading, the one-line
    relationship it illustrates, and where docs/relationships.md explains it."""

    name: str
    heading: str
    kind: str  # direct, transposed, example_C, example_U, view, depthwise, strips, slices
    number: str = ""

    def data(self):
        if self.kind == "direct":
            return direct_figure(geometry(self.number))
        if self.kind == "transposed":
            return transposed_figure(geometry(self.number))
        if self.kind in ("example_C", "example_U"):
            return example_figure()
        if self.kind == "view":
            return view_figure()
        if self.kind == "depthwise":
            return depthwise_figure()
        if self.kind == "strips":
            return [(direct_figure(g, 1), transposed_figure(g, 1) if len(g.numbers) > 1 else None) for g in FIGURES]
        if self.kind == "slices":
            return direct_figure(geometry("2.6"), 3)
        raise ValueError(self.kind)

    def relationship(self, data=None):
        """The one-line relationship, with the figure's numbers filled in
        from its data (its matrices)."""
        data = self.data() if data is None else data
        if self.kind == "direct":
            g = data.geometry
            number, formula = _DIRECT_RELATIONSHIP[self.number]
            args = f"i = {g.i}, k = {g.k}, s = {g.s}, p = {g.p}" + (f", d = {g.d}" if g.d > 1 else "")
            return f"Relationship {number}: {formula} = {data.output_size[0]} ({args})"
        if self.kind == "transposed":
            g = data.geometry
            number, formula, padding = _TRANSPOSED_RELATIONSHIP[self.number]
            a, low = data.output_padding[0], data.padding_low[0]
            inserted = f"{g.s - 1} zero{'s' if g.s > 2 else ''} inserted between pixels, " if g.s > 1 else ""
            padding += "" if padding.split("= ")[1].isdigit() else f" = {low}"
            return (
                f"Relationship {number}: {formula} = {data.output_size[0]} (i′ = {data.input_size[0]}, k = {g.k}, "
                f"s = {g.s}, p = {g.p}, a = {a}). Cᵀ·y is a stride-1 conv2d with the kernel rotated 180° over y with "
                f"{inserted}padding {padding}" + (f" plus a = {a} at the bottom/right" if a else "")
            )
        if self.kind == "example_C":
            return "Section 4.1: conv2d(x) = C·x and conv_transpose2d(y) = Cᵀ·y, the adjoint (not the inverse) of C"
        if self.kind == "example_U":
            return "im2col(x) = U·x (F.unfold) and col2im(c) = Uᵀ·c (F.fold): col2im sums the overlapping windows"
        if self.kind == "view":
            return (
                f"im2col as a view: in NHWC memory the column block of one tap is {len(data.pixels)} rows of C = "
                f"{data.channels} elements, ld = s·C = {data.ld}: no copy"
            )
        if self.kind == "depthwise":
            L, N = data.block_shape
            same = "=" if data.own_blocks else "≠"
            return (
                f"Depthwise (groups = C_in = C_out = {data.channels}): C is block-diagonal over channels, "
                f"{data.off_diagonal} nonzeros off its diagonal blocks; block c {same} conv_matrix(w[c:c+1]), channel c's "
                f"own {L}×{N} matrix: one row of {data.taps} taps per channel, no GEMM (Cᵀ, conv_transpose, likewise)"
            )
        if self.kind == "strips":
            return "Every relationship holds per axis: the figures in 1-d, each window a strip, the transpose beside it"
        if self.kind == "slices":
            g = data.geometry
            return (
                f"In 3-d, window (o₀, o₁, o₂) reads pixel o[a]·s − p + j[a]·d on every axis a: figure 2.6 "
                f"(i = {g.i}, k = {g.k}, s = {g.s}, p = {g.p}) gives {'×'.join(map(str, data.output_size))} windows"
            )
        raise ValueError(self.kind)


def _slug(words):
    return "_".join("".join(c if c.isalnum() else " " for c in words).split())


SPECS = (
    [Spec(f"fig{g.numbers[0].replace('.', '_')}_{_slug(g.words)}", f"Figure {g.numbers[0]}: {g.words}", "direct", g.numbers[0])
     for g in FIGURES]
    + [Spec(f"fig{g.numbers[1].replace('.', '_')}_transposed_{_slug(g.words)}",
            f"Figure {g.numbers[1]}: transpose of figure {g.numbers[0]}, {g.words}", "transposed", g.numbers[1])
       for g in FIGURES if len(g.numbers) > 1]
    + [
        Spec("example_C_and_Ct", "The guide's example (section 4.1): C and Cᵀ", "example_C"),
        Spec("example_U_and_Ut", "The guide's example: U and Uᵀ", "example_U"),
        Spec("im2col_view_nhwc", "im2col as a view of a channels-last input", "view"),
        Spec("depthwise_block_diagonal", "A depthwise layer: C is block-diagonal over channels", "depthwise"),
        Spec("strips_1d", "The relationships in 1-d", "strips"),
        Spec("slices_3d", "Figure 2.6 in 3-d, slice by slice", "slices"),
    ]
)  # fmt: skip


def figure_names():
    """The files that :func:`write_figures` writes."""
    return sorted([spec.name + ".png" for spec in SPECS] + ["index.html"])


# ---------------------------------------------------------------- 2. scenes (what is drawn, in cell units)

# Cell kinds; paint() gives each a colour.
PAD, INPUT, TAP, SHADOW, ZERO, OUT, CURRENT, WEIGHT, ONE, EMPTY, ROW, MEMORY, MEMORY_ALT, BLOCK = (
    "pad", "input", "tap", "shadow", "zero", "out", "current", "weight", "one", "empty", "row", "memory", "memory_alt",
    "block",
)  # fmt: skip
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def letter(label):
    """A kernel entry's letter: 1 -> 'a'."""
    return LETTERS[label - 1]


@dataclass
class Grid:
    """A grid of cells, its top-left corner at (x, y), cells `cell` units
    wide; `kinds` row by row, `labels` {(row, col): text}. `role` names what
    it shows (tests look grids up by it)."""

    x: float
    y: float
    kinds: List[List[str]]
    labels: Dict[Tuple[int, int], str] = field(default_factory=dict)
    role: str = ""
    cell: float = 1.0

    @property
    def width(self):
        return len(self.kinds[0]) * self.cell

    @property
    def height(self):
        return len(self.kinds) * self.cell

    def cells(self, *kinds):
        """The flat indices of the cells of the given kinds."""
        ncol = len(self.kinds[0])
        return {r * ncol + c for r, row in enumerate(self.kinds) for c, kind in enumerate(row) if kind in kinds}


@dataclass
class Text:
    x: float
    y: float
    text: str
    size: float = 7
    ha: str = "center"

    def extent(self):
        """(left, right) in cell units, estimated (about 0.32 units a character at size 7)."""
        width = 0.32 * self.size / 7 * max(len(line) for line in self.text.split("\n"))
        left = {"center": self.x - width / 2, "left": self.x, "right": self.x - width}[self.ha]
        return left, left + width


@dataclass
class Scene:
    """A figure in cell units: grids and texts inside (left, top, right,
    bottom), its title and the relationship it illustrates."""

    title: str
    caption: str = ""
    left: float = 0
    top: float = 0
    right: float = 0
    bottom: float = 0
    grids: List[Grid] = field(default_factory=list)
    texts: List[Text] = field(default_factory=list)

    def add(self, item):
        if isinstance(item, Grid):
            self.grids.append(item)
            box = (item.x, item.y, item.x + item.width, item.y + item.height)
        else:
            self.texts.append(item)
            box = (*item.extent(), 0, 0)
            box = (box[0], item.y - 0.5, box[1], item.y + 0.5)
        self.left, self.top = min(self.left, box[0]), min(self.top, box[1])
        self.right, self.bottom = max(self.right, box[2]), max(self.bottom, box[3])
        return item

    BORDER = 0.3  # cell units around the content, so that no edge line is clipped

    @property
    def width(self):
        return self.right - self.left + 2 * self.BORDER

    @property
    def height(self):
        return self.bottom - self.top + 2 * self.BORDER

    def grid(self, role):
        (found,) = [g for g in self.grids if g.role == role]
        return found


def _rows(flat_kinds, shape):
    """A 1-d or 2-d grid's kinds as rows (1-d: one row)."""
    ncol = shape[-1]
    return [list(flat_kinds[r * ncol:(r + 1) * ncol]) for r in range(len(flat_kinds) // ncol)]


def _labels(flat_labels, shape):
    ncol = shape[-1]
    return {(cell // ncol, cell % ncol): text for cell, text in flat_labels.items()}


def _output_kinds(size, current):
    kinds = [OUT] * math.prod(size)
    kinds[current] = CURRENT
    return kinds


def _direct_input_kinds(data, position):
    """The padded grid at one output position: input, padding, the kernel's
    shadow, and the taps that read the input (from U)."""
    n = math.prod(data.grid_size)
    kinds = [INPUT if data.is_input(c) else PAD for c in range(n)]
    labels = {}
    for tap, cell in enumerate(data.shadow[position]):
        kinds[cell] = SHADOW
        if len(data.shadow[position]) <= len(LETTERS):
            labels[cell] = LETTERS[tap]
    for tap, pixel in data.taps[position]:
        kinds[data.grid_cell(pixel)] = TAP
    return kinds, labels


def _positions(count, row_length, wanted):
    """Output positions to draw: the first ones and the last, at most `wanted`."""
    picks = [0, 1, row_length, row_length + 1, count - 1][: max(wanted - 1, 1)] + [count - 1]
    return sorted({p for p in picks if 0 <= p < count})


def _direct_scene(spec, data):
    sc = Scene(spec.heading)
    G, O = data.grid_size, data.output_size
    x = 0.0
    for position in _positions(math.prod(O), O[-1], 4):
        kinds, labels = _direct_input_kinds(data, position)
        sc.add(Grid(x, 1.5, _rows(kinds, G), _labels(labels, G), role=f"input@{position}"))
        ox = x + (G[-1] - O[-1]) / 2
        sc.add(Grid(ox, 2.5 + G[0], _rows(_output_kinds(O, position), O), role=f"output@{position}"))
        sc.add(Text(x + G[-1] / 2, 0.7, f"output {_unravel(position, O)}"))
        x += G[-1] + 1.5
    return sc


def _kernel_grid(sc, x, y, labels, k, role, caption):
    sc.add(Text(x + k / 2, y - 0.8, caption))
    cells = {(t // k, t % k): letter(v) for t, v in enumerate(labels)}
    return sc.add(Grid(x, y, [[SHADOW] * k for _ in range(k)], cells, role=role))


def _recipe_kinds(data, position):
    """The zero-inserted, padded input at one output pixel: pixels of y,
    inserted zeros, padding, and the reversed kernel's window over them."""
    kinds = [INPUT if value else (ZERO if inside else PAD) for value, inside in zip(data.grid, data.inside)]
    labels = {}
    for t, c in enumerate(data.window[position]):
        kinds[c] = TAP if data.grid[c] else SHADOW
        labels[c] = letter(data.reversed_kernel[t])
    return kinds, labels


def _transposed_scene(spec, data):
    sc = Scene(spec.heading)
    g = data.geometry
    G, I, O = data.grid_size, data.input_size, data.output_size
    _kernel_grid(sc, 0, 1.5, data.kernel, g.k, "kernel", "w")
    _kernel_grid(sc, 0, 3.5 + g.k, data.reversed_kernel, g.k, "reversed_kernel", "rot180(w)")
    # A corner, and the first output pixel that reads the most pixels of y.
    positions = [0, max(range(len(data.transposed)), key=lambda n: (len(data.transposed[n]), -n))]
    y, x0 = 1.5, g.k + 3
    for position in positions:
        # The guide's picture: rot180(w) at stride 1 over the zero-inserted, padded y ...
        x = x0
        kinds, labels = _recipe_kinds(data, position)
        sc.add(Text(x + G[-1] / 2, y - 0.8, "y, zeros inserted, padded"))
        sc.add(Grid(x, y, _rows(kinds, G), _labels(labels, G), role=f"recipe@{position}"))
        x += G[-1] + 3
        sc.add(Text(x + O[-1] / 2, y - 0.8, f"output {_unravel(position, O)}"))
        sc.add(Grid(x, y, _rows(_output_kinds(O, position), O), role=f"output@{position}"))
        x += O[-1] + 3.5
        # ... gives the same output pixel as row `position` of Cᵀ applied to y.
        kinds, labels = [INPUT] * math.prod(I), {}
        for label, pixel in data.transposed[position]:
            kinds[pixel] = TAP
            labels[pixel] = letter(label)
        sc.add(Text(x + I[-1] / 2, y - 0.8, f"y under row {position} of Cᵀ"))
        sc.add(Grid(x, y, _rows(kinds, I), _labels(labels, I), role=f"transposed@{position}"))
        x += I[-1] + 3
        y += max(G[0], O[0], I[0]) + 2
    # Cᵀ itself, its drawn rows highlighted, fitted to the height of the rows above.
    Ct = tuple(data.matrix.shape)
    cell = min(1.0, (y - 3.5) / Ct[0])
    rows = []
    for n, row in enumerate(data.matrix.tolist()):
        drawn = n in positions
        rows.append([(TAP if drawn else WEIGHT) if v else (ROW if drawn else EMPTY) for v in row])
    sc.add(Text(x + Ct[1] * cell / 2, 0.7, f"Cᵀ ({Ct[0]}×{Ct[1]})"))
    sc.add(Grid(x, 1.5, rows, role="matrix", cell=cell))
    return sc


def _matrix_grid(sc, x, y, M, role, caption, cell=1.0, labelled=True):
    values = M.long().tolist()
    kinds = [[(WEIGHT if labelled else ONE) if v else EMPTY for v in row] for row in values]
    labels = {(r, c): letter(v) for r, row in enumerate(values) for c, v in enumerate(row) if v and labelled}
    sc.add(Text(x + M.shape[1] * cell / 2, y - 0.8, caption))
    return sc.add(Grid(x, y, kinds, labels, role=role, cell=cell))


def _example_scene(spec, data):
    sc = Scene(spec.heading)
    if spec.kind == "example_C":
        _kernel_grid(sc, 0, 1.5, list(range(1, 10)), 3, "kernel", "w")
        C = _matrix_grid(sc, 4.5, 1.5, data.C, "C", "C (4×16): conv2d(x) = C·x")
        _matrix_grid(sc, C.x + C.width + 2, 1.5, data.C.t(), "Ct", "Cᵀ (16×4): conv_transpose2d(y) = Cᵀ·y")
    else:
        U = _matrix_grid(sc, 0, 1.5, data.U, "U", "U (36×16): im2col = U·x", cell=0.5, labelled=False)
        _matrix_grid(sc, U.x + U.width + 2, 1.5, data.U.t(), "Ut", "Uᵀ (16×36): col2im = Uᵀ·c", cell=0.5, labelled=False)
    return sc


def _view_scene(spec, data):
    sc = Scene(spec.heading)
    H, W = data.input_size
    C = data.channels
    marked = {off + c: m for m, off in enumerate(data.offsets) for c in range(C)}
    kinds, labels = [], {}
    for h in range(H):
        row = []
        for e in range(W * C):
            flat = h * W * C + e
            row.append(TAP if flat in marked else (MEMORY if (e // C) % 2 == 0 else MEMORY_ALT))
            if flat in marked:
                labels[(h, e)] = str(marked[flat])
        kinds.append(row)
    sc.add(Text(W * C / 2, 0.7, f"NHWC memory, one image row per line ({W} pixels × C = {C} channels)"))
    mem = sc.add(Grid(0, 1.5, kinds, labels, role="memory"))
    for h in range(H):
        sc.add(Text(-0.4, 2.0 + h, f"h={h}", size=6, ha="right"))
    x = mem.width + 2
    M = len(data.offsets)
    block = [[TAP] * C for _ in range(M)]
    block_labels = {(m, c): str(data.offsets[m] + c) for m in range(M) for c in range(C)}
    sc.add(Text(x + C, 0.7, f"tap {data.tap}, output row {data.row}"))
    sc.add(Grid(x, 1.5, block, block_labels, role="block", cell=1.6))
    sc.add(Text(x, 3.0 + 1.6 * M, f"{M}×{C} block, ld = s·C = {data.stride}·{C} = {data.ld}", ha="left"))
    sc.add(Text(x, 4.2 + 1.6 * M, "(labels: element offsets)", size=6, ha="left"))
    return sc


def _depthwise_scene(spec, data):
    """The kernels, C with its diagonal blocks shaded, and each channel's own
    matrix beside its block. Letters: the tap (a..i); the block: the channel."""
    sc = Scene(spec.heading)
    n, k, K = data.channels, data.kernel_size, data.taps
    L, N = data.block_shape

    def kinds_and_labels(M, diagonal):
        kinds, labels = [], {}
        for r, row in enumerate(M.long().tolist()):
            kinds.append([WEIGHT if v else (BLOCK if diagonal(r, c) else EMPTY) for c, v in enumerate(row)])
            labels.update({(r, c): letter(data.channel_and_tap(v)[1] + 1) for c, v in enumerate(row) if v})
        return kinds, labels

    for c in range(n):
        _kernel_grid(sc, 0, 1.5 + c * L + (L - k) / 2, list(range(1, K + 1)), k, f"kernel{c}", f"w[{c}]")
    x = k + 1.5
    kinds, labels = kinds_and_labels(data.C, lambda r, c: r // L == c // N)
    size = f"{data.input_size[0]}, {data.input_size[1]}"
    sc.add(Text(x + n * N / 2, 0.7, f"C ({n * L}×{n * N}) = conv_matrix(w, ({size}), {data.stride}, {data.padding}, groups={n})"))
    C = sc.add(Grid(x, 1.5, kinds, labels, role="C"))
    x = C.x + C.width + 2
    for c in range(n):
        kinds, labels = kinds_and_labels(data.own[c], lambda r, col: True)
        block = sc.add(Grid(x, 1.5 + c * L, kinds, labels, role=f"own{c}"))
        sc.add(Text(block.x + N + 0.6, block.y + L / 2 - 0.6, f"block ({c}, {c}) of C", ha="left"))
        sc.add(Text(block.x + N + 0.6, block.y + L / 2 + 0.6, f"= conv_matrix(w[{c}:{c + 1}], ({size}), padding={data.padding})", ha="left"))
    return sc


def _strips_scene(spec, data):
    sc = Scene(spec.heading)
    y = 1.5
    left_width = max(d.grid_size[0] + 1 + d.output_size[0] for d, _ in data) + 3
    for direct, transposed in data:
        g = direct.geometry
        G, O = direct.grid_size[0], direct.output_size[0]
        sc.add(Text(0, y - 0.8, f"{g.numbers[0]}: i={g.i} k={g.k} s={g.s} p={g.p} d={g.d}", ha="left"))
        for position in range(O):
            kinds, labels = _direct_input_kinds(direct, position)
            sc.add(Grid(0, y + position, [kinds], {(0, c): t for c, t in labels.items()}, role=f"{g.numbers[0]}:input@{position}"))
            sc.add(Grid(G + 1, y + position, [_output_kinds((O,), position)], role=f"{g.numbers[0]}:output@{position}"))
        rows = O
        if transposed is not None:
            P, I = transposed.grid_size[0], transposed.output_size[0]
            sc.add(Text(left_width, y - 0.8, f"{g.numbers[1]}: zero-inserted, padded y; rot180(w)", ha="left"))
            for position in range(I):
                kinds = [INPUT if v else (ZERO if inside else PAD) for v, inside in zip(transposed.grid, transposed.inside)]
                labels = {}
                for t, c in enumerate(transposed.window[position]):
                    kinds[c] = TAP if transposed.grid[c] else SHADOW
                    labels[(0, c)] = letter(transposed.reversed_kernel[t])
                sc.add(Grid(left_width, y + position, [kinds], labels, role=f"{g.numbers[1]}:recipe@{position}"))
                sc.add(Grid(left_width + P + 1, y + position, [_output_kinds((I,), position)], role=f"{g.numbers[1]}:output@{position}"))
            rows = max(O, I)
        y += rows + 2
    return sc


def _slices_scene(spec, data):
    sc = Scene(spec.heading)
    G, O = data.grid_size, data.output_size
    y = 1.5
    for position in (0, _ravel((1, 1, 2), O)):
        kinds, labels = _direct_input_kinds(data, position)
        plane = G[1] * G[2]
        sc.add(Text(0, y - 0.8, f"output {_unravel(position, O)}: the padded input's {G[0]} slices", ha="left"))
        x = 0.0
        for z in range(G[0]):
            sl = kinds[z * plane:(z + 1) * plane]
            sc.add(Grid(x, y, _rows(sl, G[1:]), role=f"input@{position}:{z}"))
            x += G[2] + 0.6
        x += 1.5
        out = _output_kinds(O, position)
        o_plane = O[1] * O[2]
        for z in range(O[0]):
            sc.add(Grid(x, y, _rows(out[z * o_plane:(z + 1) * o_plane], O[1:]), role=f"output@{position}:{z}"))
            x += O[2] + 0.6
        y += G[1] + 2
    return sc


_SCENES = {
    "direct": _direct_scene,
    "transposed": _transposed_scene,
    "example_C": _example_scene,
    "example_U": _example_scene,
    "view": _view_scene,
    "depthwise": _depthwise_scene,
    "strips": _strips_scene,
    "slices": _slices_scene,
}


def scene(spec, data=None):
    """What `spec`'s figure draws, from its data (built when not given),
    captioned with the relationship it illustrates."""
    data = spec.data() if data is None else data
    sc = _SCENES[spec.kind](spec, data)
    sc.caption = spec.relationship(data)
    return sc


# ---------------------------------------------------------------- 3. painting (matplotlib)

UNIT = 0.17  # inches per cell
MARGIN = 0.35  # inches around the cells
DPI = 90
COLOURS = {
    PAD: "#ffffff",
    INPUT: "#9ecae1",
    TAP: "#2171b5",
    SHADOW: "#bdbdbd",
    ZERO: "#f0f0f0",
    OUT: "#c7e9c0",
    CURRENT: "#238b45",
    WEIGHT: "#fdae6b",
    ONE: "#252525",
    EMPTY: "#ffffff",
    ROW: "#deebf7",
    MEMORY: "#dadaeb",
    MEMORY_ALT: "#f2f0f7",
    BLOCK: "#feedde",
}
DARK = {TAP, CURRENT, ONE}


def _caption_lines(sc):
    """The relationship, wrapped to the figure's width."""
    if not sc.caption:
        return []
    chars = max(int((sc.width * UNIT + 2 * MARGIN) / 0.055), 60)
    return textwrap.wrap(sc.caption, chars)


def figure_inches(sc):
    """The figure's size in inches: a function of the scene alone."""
    header = 0.45 + 0.16 * len(_caption_lines(sc))
    title = 0.1 * len(sc.title) + 2 * MARGIN  # about 0.1 inch a character at size 10, bold
    return (max(sc.width * UNIT + 2 * MARGIN, title), sc.height * UNIT + 2 * MARGIN + header)


def pixel_size(sc, dpi=DPI):
    """(width, height) of the PNG that paint() writes for `sc`."""
    w, h = figure_inches(sc)
    return round(w * dpi), round(h * dpi)


def _exact_inches(sc, dpi):
    """figure_inches, moved to whole pixels (half a pixel over, so that
    matplotlib's truncation to int gives pixel_size)."""
    return tuple((n + 0.5) / dpi for n in pixel_size(sc, dpi))


def _rgb(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))


def paint(sc, path, dpi=DPI):
    """Draws scene `sc` into the PNG `path` with matplotlib's Agg canvas
    (no pyplot, no global backend)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, h = _exact_inches(sc, dpi)
    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes(((w - sc.width * UNIT) / 2 / w, MARGIN / h, sc.width * UNIT / w, sc.height * UNIT / h))
    ax.set_axis_off()
    fig.text(0.5, 1 - 0.22 / h, sc.title, ha="center", va="center", fontsize=10, weight="bold")
    for n, line in enumerate(_caption_lines(sc)):
        fig.text(0.5, 1 - (0.5 + 0.16 * n) / h, line, ha="center", va="center", fontsize=7)
    for grid in sc.grids:
        rows, cols = len(grid.kinds), len(grid.kinds[0])
        image = np.array([[_rgb(COLOURS[k]) for k in row] for row in grid.kinds])
        x0, y0, c = grid.x, grid.y, grid.cell
        ax.imshow(image, extent=(x0, x0 + cols * c, y0 + rows * c, y0), interpolation="nearest", aspect="auto")
        ax.vlines([x0 + j * c for j in range(cols + 1)], y0, y0 + rows * c, colors="#636363", linewidth=0.4)
        ax.hlines([y0 + r * c for r in range(rows + 1)], x0, x0 + cols * c, colors="#636363", linewidth=0.4)
        size = 6 if c >= 1 else 4
        for (r, col), text in grid.labels.items():
            colour = "white" if grid.kinds[r][col] in DARK else "black"
            ax.text(x0 + (col + 0.5) * c, y0 + (r + 0.5) * c, text, ha="center", va="center", fontsize=size, color=colour)
    for t in sc.texts:
        ax.text(t.x, t.y, t.text, ha=t.ha, va="center", fontsize=t.size)
    ax.set_xlim(sc.left - sc.BORDER, sc.right + sc.BORDER)
    ax.set_ylim(sc.bottom + sc.BORDER, sc.top - sc.BORDER)
    fig.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------- writing them all


def _index_html(entries):
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>The guide\'s figures, drawn from convt_ext\'s matrices</title></head>',
        "<body>",
        "<h1>The guide's figures, drawn from convt_ext's matrices</h1>",
        "<p>Each figure of Dumoulin &amp; Visin's <i>A guide to convolution arithmetic for deep learning</i>, drawn "
        "from the nonzeros of <code>convt_ext.im2col_matrix</code> (U) and <code>convt_ext.conv_matrix</code> (C) "
        "for its exact arguments. Dark blue: the cells a kernel position reads (the nonzeros of U's row); grey: the "
        "kernel over padding or inserted zeros; green: the output position. Letters name the kernel's entries.</p>",
    ]
    for spec, relationship in entries:
        parts += [
            f'<h2 id="{spec.name}">{html.escape(spec.heading)}</h2>',
            f'<p><img src="{spec.name}.png" alt="{html.escape(spec.heading)}"></p>',
            f"<p>{html.escape(relationship)}</p>",
        ]
    parts += ["</body></html>", ""]
    return "\n".join(parts)


def write_figures(directory, dpi=DPI):
    """Writes every figure of :data:`SPECS` as DIRECTORY/name.png, and
    DIRECTORY/index.html; returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    entries, paths = [], []
    for spec in SPECS:
        sc = scene(spec)
        paths.append(paint(sc, os.path.join(directory, spec.name + ".png"), dpi))
        entries.append((spec, sc.caption))
    index = os.path.join(directory, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(_index_html(entries))
    return paths + [index]


MISSING_MATPLOTLIB = "--figures needs matplotlib, which is not installed: pip install matplotlib"


def main(directory, out=print, err=None):
    """The --figures flag of ``python -m convt_ext.explain``: 0 when written,
    1 without matplotlib."""
    err = err or (lambda line: print(line, file=sys.stderr))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        err(f"error: {MISSING_MATPLOTLIB}")
        return 1
    start = time.perf_counter()
    paths = write_figures(directory)
    out(f"wrote {len(paths) - 1} figures and {paths[-1]} in {time.perf_counter() - start:.1f} s")
    return 0
