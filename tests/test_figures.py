"""The guide's figures (convt_ext.figures, python -m convt_ext.explain --figures):
every cell a figure marks is checked against torch, never against convt_ext.

The references: a direct convolution's taps come from F.conv{1,2,3}d of an
image of pixel numbers with one-hot kernels (window l at tap t reads the pixel
whose number conv gives); a transposed convolution's from
F.conv_transpose{1,2,3}d of one-hot inputs with the kernel 1..K (output n gets
label t from input pixel m).
"""
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import convt_ext
from convt_ext import figures
from convt_ext.figures import FIGURES, SPECS, TAP, SHADOW, CURRENT, WEIGHT, ONE, BLOCK, EMPTY

D = torch.float64
CHECKOUT = Path(__file__).resolve().parents[1]  # the checkout, beside tests/
DOCS_FIGURES = CHECKOUT / "docs" / "figures"
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(convt_ext.__file__)))
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
IDS = [g.numbers[0] for g in FIGURES]


def torch_taps(size, k, s, p, d):
    """Per window position l: the sorted (tap, pixel) pairs that read the
    input, by F.conv of the pixel numbers 1..n with each one-hot kernel."""
    dims = len(size)
    numbers = torch.arange(1, math.prod(size) + 1, dtype=D).reshape(1, 1, *size)
    K = k**dims
    per_tap = []
    for t in range(K):
        onehot = torch.zeros(K, dtype=D)
        onehot[t] = 1
        per_tap.append(CONV[dims](numbers, onehot.reshape(1, 1, *(k,) * dims), None, s, p, d).flatten().long().tolist())
    L = len(per_tap[0])
    return [tuple((t, per_tap[t][l] - 1) for t in range(K) if per_tap[t][l]) for l in range(L)]


def torch_transposed(i_t, k, s, p, d, a):
    """Per output pixel n of conv_transpose (input size i_t, kernel 1..K):
    the sorted (label, input pixel) pairs, by one-hot inputs."""
    dims = len(i_t)
    w = torch.arange(1, k**dims + 1, dtype=D).reshape(1, 1, *(k,) * dims)
    columns = []
    for m in range(math.prod(i_t)):
        onehot = torch.zeros(math.prod(i_t), dtype=D)
        onehot[m] = 1
        columns.append(CONV_T[dims](onehot.reshape(1, 1, *i_t), w, None, s, p, a, 1, d).flatten().long().tolist())
    return [tuple(sorted((col[n], m) for m, col in enumerate(columns) if col[n])) for n in range(len(columns[0]))]


def unravel(flat, shape):
    return tuple(torch.unravel_index(torch.tensor(flat), shape))


# ---------------------------------------------------------------- the data, against torch


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("g", FIGURES, ids=IDS)
def test_direct_figure_marks_the_nonzeros_of_U(g, dims):
    data = figures.direct_figure(g, dims)
    assert data.output_size == (g.o,) * dims  # the size the guide prints
    want = torch_taps((g.i,) * dims, g.k, g.s, g.p, g.d)
    assert len(data.taps) == g.o**dims
    assert list(data.taps) == want
    # The kernel's whole shadow, padding included, is the same windows over the padded grid.
    grid = (g.i + 2 * g.p,) * dims
    shadow = torch_taps(grid, g.k, g.s, 0, g.d)
    assert [tuple(cell for _, cell in pairs) for pairs in shadow] == list(data.shadow)
    for position in range(len(want)):
        inside = [(t, c) for t, c in enumerate(data.shadow[position]) if data.is_input(c)]
        assert inside == [(t, data.grid_cell(pixel)) for t, pixel in data.taps[position]]
        # grid_cell shifts by the padding on every axis.
        for _, pixel in data.taps[position]:
            want_cell = [int(v) + g.p for v in unravel(pixel, (g.i,) * dims)]
            assert [int(v) for v in unravel(data.grid_cell(pixel), grid)] == want_cell


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("g", FIGURES, ids=IDS)
def test_transposed_figure_recipe_and_Ct_agree_with_torch(g, dims):
    data = figures.transposed_figure(g, dims)
    a = data.output_padding[0]
    want = torch_transposed((g.o,) * dims, g.k, g.s, g.p, g.d, a)
    assert data.output_size == (g.i,) * dims == tuple(
        CONV_T[dims](torch.zeros(1, 1, *(g.o,) * dims, dtype=D), torch.zeros(1, 1, *(g.k,) * dims, dtype=D), None, g.s, g.p, a, 1, g.d).shape[2:]
    )
    assert list(data.transposed) == want  # the rows of Cᵀ
    assert list(data.recipe) == want  # the guide's picture gives the same
    # The grid the recipe's convolution reads: y's pixel numbers s apart after d(k-1) - p zeros.
    p_low = g.d * (g.k - 1) - g.p
    assert data.padding_low == (p_low,) * dims
    grid = torch.zeros(data.grid_size, dtype=torch.long)
    inside = torch.zeros(data.grid_size, dtype=torch.long)
    stretched = (g.o - 1) * g.s + 1
    inside[(slice(p_low, p_low + stretched),) * dims] = 1
    grid[(slice(p_low, p_low + stretched, g.s),) * dims] = torch.arange(1, g.o**dims + 1).reshape((g.o,) * dims)
    assert data.grid == tuple(grid.flatten().tolist())
    assert data.inside == tuple(inside.flatten().tolist())
    assert data.reversed_kernel == tuple(reversed(data.kernel))


def test_example_figure_is_the_guide_example():
    data = figures.example_figure()
    w = torch.arange(1, 10, dtype=D).reshape(1, 1, 3, 3)
    columns = [F.conv2d(torch.eye(16, dtype=D)[c].reshape(1, 1, 4, 4), w).flatten() for c in range(16)]
    assert torch.equal(data.C, torch.stack(columns, 1))
    U = torch.zeros(36, 16, dtype=D)
    for l, pairs in enumerate(torch_taps((4, 4), 3, 1, 0, 1)):
        for t, pixel in pairs:
            U[t * 4 + l, pixel] = 1
    assert torch.equal(data.U, U)


def test_view_figure_is_a_strided_view_of_nhwc_memory():
    data = figures.view_figure()
    (H, W), C, s, k = data.input_size, data.channels, data.stride, data.kernel_size
    kh, kw = data.tap
    OW = data.output_size[1]
    assert data.ld == s * C  # DESIGN: ld = s·C
    # The pixels: torch's taps for this tap and output row.
    t = kh * k + kw
    want = [dict(torch_taps((H, W), k, s, data.padding, 1)[data.row * OW + m])[t] for m in range(OW)]
    assert list(data.pixels) == want
    # The block is an as_strided view of the NHWC image: M rows, C columns, row stride ld.
    x = torch.arange(H * W * C).reshape(H, W, C)
    block = x.as_strided((OW, C), (data.ld, 1), data.offsets[0])
    assert torch.equal(block, torch.stack([x[p // W, p % W] for p in want]))
    assert [int(v) for v in block[:, 0]] == list(data.offsets)


def torch_matrix(weight, size, s, p, groups):
    """The matrix of F.conv2d(·, weight, stride s, padding p, groups), column by column
    from one-hot inputs."""
    c_in = weight.shape[1] * groups
    n = c_in * math.prod(size)
    columns = [F.conv2d(torch.eye(n, dtype=D)[c].reshape(1, c_in, *size), weight, None, s, p, 1, groups).flatten() for c in range(n)]
    return torch.stack(columns, 1)


def test_depthwise_figure_is_block_diagonal():
    data = figures.depthwise_figure()
    n, k, K = data.channels, data.kernel_size, data.taps
    w = torch.arange(1, n * K + 1, dtype=D).reshape(n, 1, k, k)
    assert torch.equal(data.C, torch_matrix(w, data.input_size, data.stride, data.padding, n))
    L, N = data.block_shape
    assert (L, N) == (16, 16) and data.C.shape == (n * L, n * N)
    for a in range(n):
        for b in range(n):
            block = data.C[a * L:(a + 1) * L, b * N:(b + 1) * N]
            if a != b:
                assert not block.any(), (a, b)  # zero off the diagonal
                continue
            own = torch_matrix(w[a:a + 1], data.input_size, data.stride, data.padding, 1)
            assert torch.equal(block, own) and torch.equal(data.own[a], own)
            # Every entry names its channel and a tap.
            assert {data.channel_and_tap(v)[0] for v in block[block != 0].tolist()} == {a}
            assert {data.channel_and_tap(v)[1] for v in block[block != 0].tolist()} == set(range(K))
    assert data.off_diagonal == 0 and data.own_blocks


def test_depthwise_figure_shows_a_coupling(monkeypatch):
    """A weight coupling two channels (C[channel 1 ← channel 0] made nonzero): the data
    counts its nonzeros off the diagonal, the caption says so, the scene marks them."""
    real = figures.conv_matrix

    def coupled(weight, input_size, stride=1, padding=0, dilation=1, groups=1):
        C = real(weight, input_size, stride, padding, dilation, groups)
        if groups == 1:
            return C
        C = C.to_dense()
        C[16, 0] = 7  # output channel 1's first pixel reads input channel 0's first pixel
        return C.to_sparse()

    monkeypatch.setattr(figures, "conv_matrix", coupled)
    spec = next(s for s in SPECS if s.kind == "depthwise")
    data = spec.data()
    assert data.off_diagonal == 1 and data.own_blocks
    sc = figures.scene(spec, data)
    assert "1 nonzeros off its diagonal blocks" in sc.caption
    assert 16 * 48 + 0 in grids_by_role(sc)["C"].cells(WEIGHT)


# ---------------------------------------------------------------- the scenes mark what the data says


def grids_by_role(sc):
    return {g.role: g for g in sc.grids}


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_scene_marks_exactly_the_data(spec):
    data = spec.data()
    sc = figures.scene(spec, data)
    grids = grids_by_role(sc)
    checked = 0
    if spec.kind in ("direct", "slices"):
        for role, grid in grids.items():
            if not role.startswith("input@"):
                continue
            position = int(role.split("@")[1].split(":")[0])
            cells = grid.cells(TAP)
            shadow = grid.cells(TAP, SHADOW)
            if spec.kind == "slices":  # one slice per grid
                z, plane = int(role.split(":")[1]), math.prod(data.grid_size[1:])
                cells = {z * plane + c for c in cells}
                shadow = {z * plane + c for c in shadow}
                if z:
                    continue  # checked below, all slices together
                for zz in range(1, data.grid_size[0]):
                    more = grids[f"input@{position}:{zz}"]
                    cells |= {zz * plane + c for c in more.cells(TAP)}
                    shadow |= {zz * plane + c for c in more.cells(TAP, SHADOW)}
            assert cells == {data.grid_cell(pixel) for _, pixel in data.taps[position]}
            assert shadow == set(data.shadow[position])
            out = [g for r, g in grids.items() if r == f"output@{position}" or r.startswith(f"output@{position}:")]
            assert sum(len(g.cells(CURRENT)) for g in out) == 1
            checked += 1
    elif spec.kind == "transposed":
        for role, grid in grids.items():
            if role.startswith("recipe@"):
                position = int(role.split("@")[1])
                ncol = len(grid.kinds[0])
                marked = {(grid.labels[(c // ncol, c % ncol)], data.grid[c] - 1) for c in grid.cells(TAP)}
                assert marked == {(figures.letter(label), m) for label, m in data.recipe[position]}
                side = grids[f"transposed@{position}"]
                ncol = len(side.kinds[0])
                drawn = {(side.labels[(c // ncol, c % ncol)], c) for c in side.cells(TAP)}
                assert drawn == marked  # the two pictures mark the same pixels with the same weights
                assert grids[f"output@{position}"].cells(CURRENT) == {position}
                row = {c for c in grids["matrix"].cells(TAP) if c // data.matrix.shape[1] == position}
                assert {c % data.matrix.shape[1] for c in row} == {m for _, m in data.transposed[position]}
                checked += 1
    elif spec.kind in ("example_C", "example_U"):
        for role, M in (("C", data.C), ("Ct", data.C.t()), ("U", data.U), ("Ut", data.U.t())):
            if role not in grids:
                continue
            grid = grids[role]
            ncol = M.shape[1]
            assert grid.cells(WEIGHT, ONE) == set(M.flatten().nonzero().flatten().tolist())
            for (r, c), text in grid.labels.items():
                assert text == figures.letter(int(M[r, c]))
            checked += 1
    elif spec.kind == "view":
        W, C = data.input_size[1], data.channels
        assert grids["memory"].cells(TAP) == {off + c for off in data.offsets for c in range(C)}
        assert len(grids["memory"].kinds[0]) == W * C
        checked += 1
    elif spec.kind == "depthwise":
        L, N = data.block_shape
        ncol = data.C.shape[1]
        C = grids["C"]
        assert C.cells(WEIGHT) == set(data.C.flatten().nonzero().flatten().tolist())
        diagonal = {r * ncol + c for r in range(data.C.shape[0]) for c in range(ncol) if r // L == c // N}
        assert C.cells(WEIGHT, BLOCK) == diagonal  # shaded: exactly the diagonal blocks
        assert C.cells(EMPTY) | diagonal == set(range(data.C.numel()))
        for (r, c), text in C.labels.items():
            assert text == figures.letter(data.channel_and_tap(data.C[r, c])[1] + 1)
        for c in range(data.channels):
            own = grids[f"own{c}"]
            assert own.cells(WEIGHT) == set(data.own[c].flatten().nonzero().flatten().tolist())
            assert own.y == C.y + c * L  # beside its block
            checked += 1
    elif spec.kind == "strips":
        for direct, transposed in data:
            number = direct.geometry.numbers[0]
            for position in range(direct.output_size[0]):
                grid = grids[f"{number}:input@{position}"]
                assert grid.cells(TAP) == {direct.grid_cell(p) for _, p in direct.taps[position]}
                assert grid.cells(TAP, SHADOW) == set(direct.shadow[position])
                checked += 1
            if transposed is not None:
                for position in range(transposed.output_size[0]):
                    grid = grids[f"{direct.geometry.numbers[1]}:recipe@{position}"]
                    assert {transposed.grid[c] - 1 for c in grid.cells(TAP)} == {m for _, m in transposed.transposed[position]}
                    checked += 1
    assert checked, f"{spec.name}: nothing checked"


def test_the_figure_list():
    """At least 16 figures: 2.1-2.7, 4.1-4.7, 5.1 and the rest, each captioned
    with its relationship and the guide's numbers."""
    numbers = {s.number for s in SPECS if s.number}
    assert numbers == {f"2.{n}" for n in range(1, 8)} | {f"4.{n}" for n in range(1, 8)} | {"5.1"}
    assert len(SPECS) >= 16 and len({s.name for s in SPECS}) == len(SPECS)
    for spec in SPECS:
        caption = figures.scene(spec).caption
        if spec.kind == "direct":
            g = figures.geometry(spec.number)
            assert caption.startswith("Relationship ") and f"= {g.o} (i = {g.i}, k = {g.k}" in caption
        if spec.kind == "transposed":
            g = figures.geometry(spec.number)
            assert f"= {g.i} (i′ = {g.o}, k = {g.k}" in caption and "Cᵀ" in caption


def test_data_and_scenes_need_no_matplotlib(tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from convt_ext import figures\n"
        "n = sum(len(figures.scene(spec).grids) > 0 for spec in figures.SPECS)\n"
        "assert n == len(figures.SPECS), n\n"
        "assert 'matplotlib.figure' not in sys.modules\n"
        "print('ok', n)\n"
    )
    proc = run_python("-c", code, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ok {len(SPECS)}", proc.stderr


def test_without_matplotlib_figures_says_so_and_fails(tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from convt_ext import explain\n"
        f"sys.exit(explain.main(['--figures', {str(tmp_path / 'out')!r}]))\n"
    )
    proc = run_python("-c", code, cwd=tmp_path)
    assert proc.returncode == 1
    assert "needs matplotlib" in proc.stderr and "pip install matplotlib" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- drawing them (matplotlib, Agg)


def run_python(*args, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def png_size(path):
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    import matplotlib  # noqa: F401  (a test dependency: the README's test command installs it)

    out = tmp_path_factory.mktemp("figures")
    start = time.perf_counter()
    proc = run_python("-m", "convt_ext.explain", "--figures", str(out), cwd=out)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, seconds, proc.stdout


def test_figures_flag_writes_every_figure_and_an_index(written):
    # (Its wall time, 6-12 s here, is reported, not asserted: timings belong to the benchmark.)
    out, seconds, stdout = written
    print(f"--figures took {seconds:.1f} s")
    assert sorted(os.listdir(out)) == figures.figure_names()
    assert len([n for n in os.listdir(out) if n.endswith(".png")]) >= 16
    assert f"wrote {len(SPECS)} figures" in stdout
    index = (out / "index.html").read_text(encoding="utf-8")
    import html

    for spec in SPECS:
        at = index.index(f'<img src="{spec.name}.png"')
        caption = html.escape(figures.scene(spec).caption)
        assert index.index(f"<p>{caption}</p>", at) > at  # the relationship, under its figure


def test_depthwise_figure_is_written(written):
    out, _, _ = written
    spec = next(s for s in SPECS if s.kind == "depthwise")
    assert spec.name == "depthwise_block_diagonal"
    path = out / f"{spec.name}.png"
    assert path.exists() and png_size(path) == figures.pixel_size(figures.scene(spec))
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "0 nonzeros off its diagonal blocks; block c = conv_matrix(w[c:c+1])" in index


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_each_png_has_its_layout_size_and_is_drawn(written, spec):
    from matplotlib.image import imread

    out, _, _ = written
    path = out / f"{spec.name}.png"
    sc = figures.scene(spec)
    assert png_size(path) == figures.pixel_size(sc)
    w, h = png_size(path)
    assert 300 <= w <= 2000 and 200 <= h <= 2000
    image = imread(path)
    colours = {tuple(px) for px in image.reshape(-1, image.shape[-1])[:: 7].tolist()}
    assert len(colours) > 5  # not blank: cells, lines and text
    # Every cell kind the scene uses is painted in its colour somewhere.
    used = {kind for grid in sc.grids for row in grid.kinds for kind in row}
    for kind in used:
        rgb = tuple(int(figures.COLOURS[kind][i : i + 2], 16) for i in (1, 3, 5))
        pixels = (image[..., :3] * 255).round().reshape(-1, 3)
        assert (pixels == torch.tensor(rgb).numpy()).all(1).any(), (kind, rgb)


# ---------------------------------------------------------------- the committed figures


def test_docs_figures_are_the_generated_set():
    """docs/figures holds what --figures writes (the file names; pixels are not compared):
    regenerate with python -m convt_ext.explain --figures docs/figures."""
    assert sorted(os.listdir(DOCS_FIGURES)) == figures.figure_names()
    total = sum(p.stat().st_size for p in DOCS_FIGURES.iterdir())
    assert total < 2_000_000, total


def test_docs_and_readme_show_the_figures():
    docs = (CHECKOUT / "docs" / "relationships.md").read_text(encoding="utf-8")
    for spec in SPECS:
        assert f"](figures/{spec.name}.png)" in docs, spec.name
    readme = (CHECKOUT / "README.md").read_text(encoding="utf-8")
    api = readme.index("## API")
    shown = readme.index("](docs/figures/fig4_")
    assert shown < api
    name = readme[shown + len("](docs/figures/"):].split(")")[0]
    assert (DOCS_FIGURES / name).exists()


def test_docs_captions_are_the_generated_relationships():
    """Under each figure, docs/relationships.md prints the relationship its PNG is captioned with."""
    docs = (CHECKOUT / "docs" / "relationships.md").read_text(encoding="utf-8")
    for spec in SPECS:
        assert f"](figures/{spec.name}.png)\n*{figures.scene(spec).caption}*\n" in docs, spec.name


def test_the_test_command_installs_matplotlib_in_the_readme_and_ci():
    """The README's test command and .ci/run's readme_tests() agree word for word, and install
    matplotlib, so that the drawing tests above run rather than skip."""
    readme = (CHECKOUT / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if line.rstrip().endswith("python -P -m pytest tests"))
    ci = (CHECKOUT / ".ci" / "run").read_text(encoding="utf-8")
    body = ci[ci.index("readme_tests() {"):].splitlines()[1].strip()
    assert body == command.strip()
    assert "matplotlib" in command.split("&&")[0].split()
