"""python -m convt_ext.explain: it runs, every claim holds (and would show ✗
if it did not), flags choose the geometry, bad flags are refused."""
import io
import os
import subprocess
import sys

import pytest
import torch

import convt_ext
from convt_ext import explain

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(convt_ext.__file__)))


def run_explain(*flags, encoding="utf-8", cwd=None):
    """Runs the walk-through in a fresh interpreter, importing the same
    convt_ext as this test session."""
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONIOENCODING"] = encoding
    return subprocess.run(
        [sys.executable, "-m", "convt_ext.explain", *flags],
        capture_output=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_runs_and_every_claim_holds(tmp_path):
    proc = run_explain(cwd=tmp_path)
    out = proc.stdout.decode("utf-8")
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert "✗" not in out
    assert out.count("✓") >= 20
    for text in ("x1.grad", "Cᵀ·ones", "Cᵀ·y1", "rot180(w)", "zero(s) inserted", "output_padding", "groups 2", "Summary"):
        assert text in out, text
    # Headed sections and aligned matrices.
    assert "\n═══" in out
    assert "    [  1  2  3  4 ]\n    [  5  6  7  8 ]" in out


def test_flags_choose_the_geometry(tmp_path):
    flags = ["--kernel", "3", "--stride", "3", "--padding", "1", "--dilation", "2", "--size", "7", "--seed", "5"]
    proc = run_explain(*flags, cwd=tmp_path)
    out = proc.stdout.decode("utf-8")
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert "✗" not in out and "✓" in out
    assert "2. Stride 3" in out and "Dilation 2" in out


def test_ascii_fallback(tmp_path):
    proc = run_explain(encoding="ascii", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode("ascii")  # raises if anything non-ASCII got through
    assert "[ok]" in out and "[FAIL]" not in out
    assert "C^T*ones" in out


@pytest.mark.parametrize(
    "flags, mentions",
    [
        (["--stride", "0"], "--stride"),
        (["--kernel", "abc"], "--kernel"),
        (["--padding", "-1"], "--padding"),
        (["--dilation", "0"], "--dilation"),
        (["--size", "2", "--kernel", "5"], "--size"),
        (["--wrong"], "unrecognized"),
    ],
)
def test_bad_flags_are_refused(flags, mentions, capsys):
    with pytest.raises(SystemExit) as info:
        explain.main(flags)
    assert info.value.code != 0
    captured = capsys.readouterr()
    assert "error" in captured.err and mentions in captured.err
    assert captured.out == ""


def test_bad_flags_exit_nonzero_with_a_message(tmp_path):
    proc = run_explain("--stride", "0", cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "error" in err and "--stride" in err
    assert proc.stdout == b""


@pytest.mark.parametrize(
    "geometry",
    [
        dict(),
        dict(kernel=3, stride=3, padding=1, dilation=2, size=7),
        dict(kernel=2, stride=1, padding=0, dilation=3, size=7),
        dict(kernel=1, stride=2, padding=2, dilation=1, size=3),
        dict(kernel=4, stride=2, padding=3, dilation=1, size=1),
        dict(kernel=3, stride=1, padding=1, dilation=1, size=5),
        dict(kernel=5, stride=4, padding=0, dilation=2, size=12, seed=3),
    ],
)
def test_claims_all_hold(geometry):
    claims = explain.check_claims(**geometry)
    assert len(claims) >= 20
    assert all(isinstance(text, str) and isinstance(holds, bool) for text, holds in claims)
    assert [text for text, holds in claims if not holds] == []


def test_claims_include_the_expected_differences():
    texts = [text for text, _ in explain.check_claims()]
    assert "Cᵀ·y1 ≠ x1.grad" in texts
    assert any(t.startswith("x1.grad = Cᵀ·ones") for t in texts)
    assert any(t.startswith("conv_transpose2d(y1, w1) ≠ conv2d(y1, w1, padding=2)") for t in texts)
    assert any("rot180" in t for t in texts)
    assert any(t.startswith("C·Cᵀ ≠ I") for t in texts)


def test_claims_are_computed_and_can_fail(monkeypatch, capsys):
    """Break one library function: its claims turn ✗ and main exits 1."""
    real = explain.conv_transpose2d_as_conv2d
    monkeypatch.setattr(explain, "conv_transpose2d_as_conv2d", lambda *a, **k: real(*a, **k) + 1)
    failed = [text for text, holds in explain.check_claims() if not holds]
    assert any("conv_transpose2d_as_conv2d" in t for t in failed)
    assert explain.main([]) == 1
    assert "✗" in capsys.readouterr().out


@pytest.mark.parametrize("dims,broken", [(1, "copy"), (2, "copy"), (3, "copy"), (2, "transposed"), (3, "transposed")])
def test_im2col_view_claim_is_computed(dims, broken, monkeypatch):
    """The claim that im2col_view's strides are U's nonzeros holds, and fails for a view
    that copies, or that shares x's memory but reads the pixels in another order."""
    import convt_ext.functional

    text = "im2col_view(x1) copies nothing: its element (j, l) is the pixel where U's row j·L + l has its 1"
    assert (text, True) in explain.check_claims(dims=dims)
    real = convt_ext.functional.im2col_view
    if broken == "copy":
        fake = lambda x, k, *a: real(x.clone(), k, *a)  # noqa: E731
    else:  # the last two axes swapped: the same memory and shape (x1 is square), other strides
        fake = lambda x, k, *a: real(x.transpose(-1, -2), k, *a)  # noqa: E731
    monkeypatch.setattr(convt_ext.functional, "im2col_view", fake)
    assert (text, False) in explain.check_claims(dims=dims)


def test_an_expected_difference_can_fail(monkeypatch):
    """If conv2d did rotate the kernel, "conv_transpose2d(y1, w1) ≠ conv2d(y1,
    w1, padding=2)" would be ✗."""
    real = explain.F.conv2d

    class Flipping:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def conv2d(input, weight, *args, **kwargs):
            if kwargs.get("padding") == 2:
                weight = weight.flip(-2, -1)
            return real(input, weight, *args, **kwargs)

    monkeypatch.setattr(explain, "F", Flipping())
    failed = [text for text, holds in explain.check_claims() if not holds]
    assert any(t.startswith("conv_transpose2d(y1, w1) ≠ conv2d(y1, w1, padding=2)") for t in failed)


def test_main_in_process(capsys):
    assert explain.main(["--size", "5"]) == 0
    out = capsys.readouterr().out
    assert "✗" not in out and "claims hold" in out


def test_format_matrix_aligns_columns():
    text = explain.format_matrix(torch.tensor([[1.0, -20.0], [300.0, 4.0]]), indent="")
    rows = text.split("\n")
    assert rows == ["[   1 -20 ]", "[ 300   4 ]"]
    text = explain.format_matrix(torch.tensor([[0.5, 0.0], [-0.0001, 12.25]]), zero=".", indent="")
    assert text.split("\n") == ["[  0.50     . ]", "[  0.00 12.25 ]"]
    assert explain.format_matrix(torch.tensor([1.0, 2.0]), indent="") == "[ 1 2 ]"
    with pytest.raises(ValueError):
        explain.format_matrix(torch.zeros(2, 2, 2))


# ---------------------------------------------------------------- --dims 1 and --dims 3


def test_dims_3_every_claim_holds_in_ascii(monkeypatch):
    """--dims 3 on a stream that cannot encode the Unicode symbols (in process: the fresh
    interpreter and the encoding fallback are checked above in 2-d)."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", stream)
    assert explain.main(["--dims", "3", "--size", "5"]) == 0
    stream.flush()
    out = raw.getvalue().decode("ascii")  # raises if anything non-ASCII got through
    assert "[ok]" in out and "[FAIL]" not in out
    for text in ("in 3-d", "1x1x4x4x4", "conv3d(x1, w1)", "conv_transpose3d(y1, w1)", "flip(w)", "C^T*ones", "Summary"):
        assert text in out, text
    # A small 3-d tensor prints slice by slice.
    assert "x (4x4x4), one slice per index of the first axis:\n    [0, :, :]\n    [  1  2  3  4 ]" in out


def test_dims_1_in_process(capsys):
    assert explain.main(["--dims", "1"]) == 0
    out = capsys.readouterr().out
    assert "✗" not in out and "claims hold" in out
    for text in ("in 1-d", "conv1d(x1, w1)", "conv_transpose1d_as_conv1d", "flip(w)", "(C_in, C_out/groups, k)"):
        assert text in out, text
    # The guide's example in 1-d: the 2×4 matrix C prints in full.
    assert "  x (4):\n    [ 1 2 3 4 ]" in out
    assert "  C (2×4):\n" in out


def test_dims_2_is_the_default(capsys):
    assert explain.main(["--size", "5"]) == 0
    default = capsys.readouterr().out
    assert explain.main(["--size", "5", "--dims", "2"]) == 0
    assert capsys.readouterr().out == default


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize(
    "geometry",
    [
        dict(kernel=3, stride=3, padding=1, dilation=2, size=7),
        dict(kernel=4, stride=2, padding=3, dilation=1, size=1),
        dict(kernel=2, stride=1, padding=0, dilation=3, size=4, seed=2),
    ],
)
def test_claims_all_hold_nd(dims, geometry):
    claims = explain.check_claims(**geometry, dims=dims)
    assert len(claims) >= 20
    assert [text for text, holds in claims if not holds] == []
    texts = [text for text, _ in claims]
    assert "Cᵀ·y1 ≠ x1.grad" in texts
    assert any(t.startswith(f"conv_transpose{dims}d(y1, w1) ≠ conv{dims}d(y1, w1, padding=2)") for t in texts)
    assert any(t.startswith(f"Cᵀ·y1 = conv_transpose{dims}d(y1, w1)") for t in texts)
    assert any(t.startswith(f"C·x = conv{dims}d(x, w)") for t in texts)
    assert any(t.startswith(f"convt_ext.conv_transpose{dims}d_as_conv{dims}d") for t in texts)
    assert not any("conv2d" in t for t in texts)


@pytest.mark.parametrize("dims", [1, 3])
def test_claims_nd_are_computed_and_can_fail(dims, monkeypatch):
    """Break the N-d recipe, or the direct convolution that the puzzles compare with: the
    claims that use it turn ✗."""
    name = f"conv_transpose{dims}d_as_conv{dims}d"
    real = getattr(explain, name)
    monkeypatch.setattr(explain, name, lambda *a, **k: real(*a, **k) + 1)
    failed = [text for text, holds in explain.check_claims(dims=dims) if not holds]
    assert failed and all(name in t for t in failed)
    monkeypatch.undo()

    real_conv = getattr(torch.nn.functional, f"conv{dims}d")

    class Flipping:
        def __getattr__(self, attr):
            return getattr(torch.nn.functional, attr)

    def flipping(input, weight, *args, **kwargs):
        if kwargs.get("padding") == 2:
            weight = weight.flip(tuple(range(2, weight.dim())))
        return real_conv(input, weight, *args, **kwargs)

    fake = Flipping()
    setattr(fake, f"conv{dims}d", flipping)
    monkeypatch.setattr(explain, "F", fake)
    failed = [text for text, holds in explain.check_claims(dims=dims) if not holds]
    assert any(t.startswith(f"conv_transpose{dims}d(y1, w1) ≠ conv{dims}d(y1, w1, padding=2)") for t in failed)


@pytest.mark.parametrize("value", ["0", "4", "two"])
def test_bad_dims_are_refused(value, capsys):
    with pytest.raises(SystemExit) as info:
        explain.main(["--dims", value])
    assert info.value.code != 0
    captured = capsys.readouterr()
    assert "error" in captured.err and "--dims" in captured.err
    assert captured.out == ""


# ---------------------------------------------------------------- section 4: depthwise

DEPTHWISE_CLAIMS = {
    "blocks": "C is block-diagonal: none of its",
    "own": "its diagonal block c is conv_matrix(w[c:c+1]), channel c's own single-channel",
    "conv": "convt_ext.conv{d}d on the depthwise path = C·x",
    "tconv": "convt_ext.conv_transpose{d}d on the depthwise path = Cᵀ·y",
    "view": "every tap's block of im2col_view(x) copies nothing",
    "diagonal": "the sum over the",
}


def depthwise_claims(claims, dims=2):
    """{key: (text, holds)} for section 4's claims, each found once."""
    found = {}
    for key, start in DEPTHWISE_CLAIMS.items():
        (found[key],) = [(t, h) for t, h in claims if t.startswith(start.format(d=dims))]
    return found


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("geometry", [dict(), dict(kernel=3, stride=3, padding=1, dilation=2, size=7), dict(kernel=4, stride=2, padding=3, dilation=1, size=1)])
def test_depthwise_claims_hold(dims, geometry):
    found = depthwise_claims(explain.check_claims(**geometry, dims=dims), dims)
    assert all(holds for _, holds in found.values()), found
    assert "diag(w[:, 0, j])" in found["diagonal"][0] and f"conv{dims}d on the depthwise path" in found["diagonal"][0]


def test_depthwise_section_prints_the_blocks(capsys):
    assert explain.main([]) == 0
    out = capsys.readouterr().out
    section = out[out.index("4. Depthwise"):out.index("Summary")]
    assert "✗" not in section and section.count("✓") == len(DEPTHWISE_CLAIMS)
    # 6×6 input, k=3, s=2, p=1: 3×3 windows, 64 nonzeros per channel, none off the diagonal.
    assert "groups=3) is 27×108: 3×3 blocks of 9×36" in section
    assert "    [ 64  0  0 ]\n    [  0 64  0 ]\n    [  0  0 64 ]" in section
    assert "(3 calls:" in section


def _coupled(real):
    """conv_matrix with a coupling between channels added to a depthwise weight:
    the same diagonal, plus 0.01 off it (a dense, groups=1 layer)."""

    def conv_matrix(weight, input_size, stride=1, padding=0, dilation=1, groups=1):
        if groups > 1 and groups == weight.shape[0] and weight.shape[1] == 1:
            n = groups
            eye = torch.eye(n, dtype=weight.dtype).reshape(n, n, *([1] * (weight.dim() - 2)))
            dense = eye * weight.transpose(0, 1) + (1 - eye) * 0.01
            return real(dense, input_size, stride, padding, dilation, 1)
        return real(weight, input_size, stride, padding, dilation, groups)

    return conv_matrix


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_depthwise_coupling_between_channels_fails(dims, monkeypatch):
    """A weight that couples the channels off the diagonal: C is no longer
    block-diagonal and no longer the depthwise convolution; its diagonal
    blocks are still each channel's own matrix."""
    monkeypatch.setattr(explain, "conv_matrix", _coupled(explain.conv_matrix))
    claims = explain.check_claims(dims=dims)
    found = depthwise_claims(claims, dims)
    assert {key for key, (_, holds) in found.items() if not holds} == {"blocks", "conv", "tconv"}
    assert [t for t, holds in claims if not holds] == [found[key][0] for key in ("blocks", "conv", "tconv")]


def test_depthwise_claims_need_the_depthwise_path(monkeypatch):
    """If set_conv_path("depthwise") ran the column path, the counter says so and the
    path's claims fail; the setting before the section is restored either way."""
    real = convt_ext.set_conv_path
    monkeypatch.setattr(convt_ext, "set_conv_path", lambda path: real("columns" if path == "depthwise" else path))
    before = convt_ext.conv_path()
    found = depthwise_claims(explain.check_claims())
    assert {key for key, (_, holds) in found.items() if not holds} == {"conv", "tconv", "diagonal"}
    assert convt_ext.conv_path() == before


def test_depthwise_view_claim_is_computed(monkeypatch):
    """A view that copies x: the products still sum to the output, but the
    claim that the blocks are x's memory fails."""
    import convt_ext.functional

    real = convt_ext.functional.im2col_view
    monkeypatch.setattr(convt_ext.functional, "im2col_view", lambda x, *a: real(x.clone(), *a))
    found = depthwise_claims(explain.check_claims())
    assert {key for key, (_, holds) in found.items() if not holds} == {"view"}
