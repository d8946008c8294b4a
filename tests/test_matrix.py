"""convt_ext.matrix: C and U as sparse matrices, the transposed convolution as
a direct one (the guide's relationships 1-15), and output_padding_for.

Expected values come from torch.nn.functional (or from the guide's formulas
written out here), never from convt_ext.
"""
import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

import convt_ext
import convt_ext.matrix as matrix_module
from convt_ext.figures import FIGURES

D = torch.float64


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=D)


def random_conv(pyrng):
    """A random valid direct-convolution geometry (non-square, grouped, dilated)."""
    while True:
        g = pyrng.choice([1, 1, 2, 3])
        geo = dict(
            groups=g,
            c_in=g * pyrng.randint(1, 3),
            c_out=g * pyrng.randint(1, 3),
            kernel=(pyrng.randint(1, 4), pyrng.randint(1, 4)),
            stride=(pyrng.randint(1, 3), pyrng.randint(1, 3)),
            padding=(pyrng.randint(0, 2), pyrng.randint(0, 2)),
            dilation=(pyrng.randint(1, 3), pyrng.randint(1, 3)),
            size=(pyrng.randint(1, 8), pyrng.randint(1, 8)),
        )
        span = [geo["size"][i] + 2 * geo["padding"][i] - geo["dilation"][i] * (geo["kernel"][i] - 1) for i in range(2)]
        if min(span) >= 1:
            return geo


def random_transposed(pyrng):
    """A random geometry that F.conv_transpose2d accepts, with output_padding
    anywhere in [0, max(stride, dilation)) and padding that may exceed d(k-1)."""
    while True:
        g = pyrng.choice([1, 1, 2, 3])
        s = (pyrng.randint(1, 3), pyrng.randint(1, 3))
        d = (pyrng.randint(1, 3), pyrng.randint(1, 3))
        geo = dict(
            groups=g,
            c_in=g * pyrng.randint(1, 3),
            c_out=g * pyrng.randint(1, 2),
            kernel=(pyrng.randint(1, 4), pyrng.randint(1, 4)),
            stride=s,
            padding=(pyrng.randint(0, 3), pyrng.randint(0, 3)),
            output_padding=(pyrng.randrange(max(s[0], d[0])), pyrng.randrange(max(s[1], d[1]))),
            dilation=d,
            size=(pyrng.randint(1, 5), pyrng.randint(1, 5)),
        )
        out = [
            (geo["size"][i] - 1) * s[i] - 2 * geo["padding"][i] + d[i] * (geo["kernel"][i] - 1) + geo["output_padding"][i] + 1
            for i in range(2)
        ]
        if min(out) >= 1:
            return geo


def t_args(geo):
    return (geo["stride"], geo["padding"], geo["output_padding"], geo["groups"], geo["dilation"])


# ---------------------------------------------------------------- the guide's example


def hand_built_C(w):
    """The comment's matrix, entry by entry: C[0,:3]=w[0]; C[0,4:7]=w[1];
    C[0,8:11]=w[2]; C[1,1:4]=w[0]; ... C[3,13:]=w[2]."""
    C = torch.zeros(4, 16, dtype=w.dtype)
    C[0, 0:3] = w[0]
    C[0, 4:7] = w[1]
    C[0, 8:11] = w[2]
    C[1, 1:4] = w[0]
    C[1, 5:8] = w[1]
    C[1, 9:12] = w[2]
    C[2, 4:7] = w[0]
    C[2, 8:11] = w[1]
    C[2, 12:15] = w[2]
    C[3, 5:8] = w[0]
    C[3, 9:12] = w[1]
    C[3, 13:16] = w[2]
    return C


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_guide_example_matrix_is_exactly_the_hand_built_C(rng, dtype):
    w = torch.rand(3, 3, generator=rng, dtype=torch.float64).to(dtype)
    w1 = w.view(1, 1, 3, 3)
    C = convt_ext.conv_matrix(w1, (4, 4))
    assert C.layout == torch.sparse_coo and C.is_coalesced()
    assert C.dtype == dtype and C.shape == (4, 16)
    assert torch.equal(C.to_dense(), hand_built_C(w))


def test_guide_example_facts(rng):
    x = torch.arange(1, 17, dtype=D).reshape(4, 4)
    w = torch.rand(3, 3, generator=rng, dtype=D)
    x1 = x.view(1, 1, 4, 4).clone().requires_grad_()
    w1 = w.view(1, 1, 3, 3)
    y1 = F.conv2d(x1, w1)
    y1.backward(torch.ones_like(y1))
    C = hand_built_C(w)
    assert torch.allclose(C @ x.flatten(), y1.detach().flatten())
    ct_y1 = (C.t() @ y1.detach().flatten()).view(4, 4)
    ct_ones = (C.t() @ torch.ones(4, dtype=D)).view(4, 4)
    assert torch.allclose(x1.grad[0, 0], ct_ones)
    assert not torch.allclose(x1.grad[0, 0], ct_y1)
    transposed = convt_ext.conv_transpose2d(y1.detach(), w1)
    assert torch.allclose(transposed[0, 0], ct_y1)
    assert not torch.allclose(transposed, F.conv2d(y1.detach(), w1, padding=2))
    assert torch.allclose(transposed, F.conv2d(y1.detach(), w1.flip(-2, -1), padding=2))
    # The adjoint, not the inverse: C C^T != I.
    assert not torch.allclose(C @ C.t(), torch.eye(4, dtype=D))


def test_docs_example_C_Ct_is_not_the_identity():
    """docs/relationships.md: w = [[1, 2], [3, 4]] over 3x3 gives this C C^T."""
    w = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=D)
    C = convt_ext.conv_matrix(w, (3, 3)).to_dense()
    want = torch.tensor([[30, 14, 11, 4], [14, 30, 6, 11], [11, 6, 30, 14], [4, 11, 14, 30]], dtype=D)
    assert torch.equal(C @ C.t(), want)
    # The reference Jacobian from F.conv2d agrees.
    basis = torch.eye(9, dtype=D).view(9, 1, 3, 3)
    assert torch.equal(F.conv2d(basis, w).reshape(9, 4).t(), C)


# ---------------------------------------------------------------- conv_matrix


def dense_reference(w, geo):
    """C from F.conv2d applied to every unit image (the test's reference only)."""
    c_in, (h, wd) = geo["c_in"], geo["size"]
    n = c_in * h * wd
    basis = torch.eye(n, dtype=D).view(n, c_in, h, wd)
    out = F.conv2d(basis, w, None, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    return out.reshape(n, -1).t()


@pytest.mark.parametrize("case", range(25))
def test_conv_matrix_random(case, pyrng, rng):
    geo = random_conv(pyrng)
    k, g = geo["kernel"], geo["groups"]
    w = rand(rng, geo["c_out"], geo["c_in"] // g, *k)
    s, p, d = geo["stride"], geo["padding"], geo["dilation"]
    C = convt_ext.conv_matrix(w, geo["size"], s, p, d, g)
    x = rand(rng, geo["c_in"], *geo["size"])
    y_ref = F.conv2d(x[None], w, None, s, p, d, g)
    oh, ow = y_ref.shape[-2:]
    assert C.layout == torch.sparse_coo and C.is_coalesced() and C.dtype == D
    assert C.shape == (geo["c_out"] * oh * ow, geo["c_in"] * geo["size"][0] * geo["size"][1])
    assert torch.allclose(C.to_dense(), dense_reference(w, geo))
    assert torch.allclose(C @ x.flatten(), y_ref.flatten())
    a = [(geo["size"][i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) % s[i] for i in range(2)]
    y = rand(rng, geo["c_out"], oh, ow)
    ref = F.conv_transpose2d(y[None], w, None, s, p, a, g, d)
    assert ref.shape[-2:] == tuple(geo["size"])
    assert torch.allclose(C.t() @ y.flatten(), ref.flatten())


def test_conv_matrix_accepts_ints_and_keeps_device_dtype(rng):
    w = rand(rng, 4, 1, 3, 3)
    C = convt_ext.conv_matrix(w, 5, stride=2, padding=1, dilation=1, groups=4)
    x = rand(rng, 4, 5, 5)
    assert torch.allclose(C @ x.flatten(), F.conv2d(x[None], w, None, 2, 1, 1, 4).flatten())
    assert convt_ext.conv_matrix(w.float(), 5).dtype == torch.float32


def test_conv_matrix_comes_from_the_index_mapping(monkeypatch, rng):
    """Every tap of U gets one stored entry per (out, in) channel pair, weight
    zeros included, and no convolution runs while C is built."""
    w = rand(rng, 4, 3, 2, 3)
    w[0, 0] = 0.0
    geo = dict(size=(5, 6), stride=(2, 1), padding=(1, 2), dilation=(1, 2))

    def refuse(*args, **kwargs):
        raise AssertionError("conv_matrix must not run a convolution")

    monkeypatch.setattr(F, "conv2d", refuse)
    monkeypatch.setattr(torch, "conv2d", refuse)
    monkeypatch.setattr(convt_ext, "conv2d", refuse)
    monkeypatch.setattr(convt_ext.functional, "conv2d", refuse)
    monkeypatch.setattr(matrix_module, "conv2d", refuse)
    C = convt_ext.conv_matrix(w, geo["size"], geo["stride"], geo["padding"], geo["dilation"], groups=2)
    U = convt_ext.im2col_matrix(geo["size"], (2, 3), geo["dilation"], geo["padding"], geo["stride"])
    monkeypatch.undo()
    assert C._nnz() == 4 * 3 * U._nnz()
    ref = dense_reference(w, dict(geo, c_in=6, groups=2))
    assert torch.allclose(C.to_dense(), ref)


def test_conv_matrix_is_differentiable_in_the_weight(rng):
    w = rand(rng, 3, 2, 2, 2).requires_grad_()
    x = rand(rng, 2, 4, 5)
    C = convt_ext.conv_matrix(w, (4, 5), stride=(1, 2), dilation=(2, 1))
    u = rand(rng, C.shape[0])
    (got,) = torch.autograd.grad(torch.dot(C @ x.flatten(), u), w)
    w_ref = w.detach().clone().requires_grad_()
    y = F.conv2d(x[None], w_ref, None, (1, 2), 0, (2, 1))
    (want,) = torch.autograd.grad(y, w_ref, u.view_as(y))
    assert torch.allclose(got, want)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda w: convt_ext.conv_matrix(w, (2, 2)), ValueError),  # 3x3 kernel over 2x2
        (lambda w: convt_ext.conv_matrix(w, (5, 5), groups=2), ValueError),  # 1 out channel, 2 groups
        (lambda w: convt_ext.conv_matrix(w[0], (5, 5)), ValueError),  # 3-d weight
        (lambda w: convt_ext.conv_matrix(w, (5, 5), stride=0), ValueError),
        (lambda w: convt_ext.conv_matrix(w, (5, 5), padding=-1), ValueError),
        (lambda w: convt_ext.conv_matrix(w, (5, 5), stride=True), TypeError),
        (lambda w: convt_ext.conv_matrix("w", (5, 5)), TypeError),
    ],
)
def test_conv_matrix_rejects_bad_arguments(call, error):
    with pytest.raises(error):
        call(torch.ones(1, 1, 3, 3, dtype=D))


# ---------------------------------------------------------------- im2col_matrix


@pytest.mark.parametrize("case", range(15))
def test_im2col_matrix_is_unfold_and_its_transpose_is_fold(case, pyrng, rng):
    geo = random_conv(pyrng)
    k, d, p, s = geo["kernel"], geo["dilation"], geo["padding"], geo["stride"]
    U = convt_ext.im2col_matrix(geo["size"], k, d, p, s)
    assert U.layout == torch.sparse_coo and U.is_coalesced() and U.dtype == torch.float64
    x = rand(rng, 1, 1, *geo["size"])
    cols = F.unfold(x, k, d, p, s)
    assert U.shape == (cols.shape[1] * cols.shape[2], x.numel())
    assert torch.equal(U.coalesce().values(), torch.ones(U._nnz(), dtype=D))
    assert torch.allclose(U @ x.flatten(), cols.flatten())
    c = rand(rng, *cols.shape)
    assert torch.allclose(U.t() @ c.flatten(), F.fold(c, geo["size"], k, d, p, s).flatten())
    # The library's own im2col/col2im agree with U and U^T too.
    assert torch.allclose(convt_ext.im2col(x[0], k, d, p, s).flatten(), U @ x.flatten())
    assert torch.allclose(convt_ext.col2im(c[0], geo["size"], k, d, p, s).flatten(), U.t() @ c.flatten())


def test_im2col_matrix_dtype_and_errors():
    assert convt_ext.im2col_matrix((4, 4), 3, dtype=torch.float32).dtype == torch.float32
    assert convt_ext.im2col_matrix(4, 3).to_dense().sum() == 9 * 4
    with pytest.raises(ValueError):
        convt_ext.im2col_matrix((2, 2), 3)
    with pytest.raises(ValueError):
        convt_ext.im2col_matrix((4, 4), 3, stride=0)


# ---------------------------------------------------------------- transposed as direct


@pytest.mark.parametrize("case", range(30))
def test_conv_transpose2d_as_conv2d_matches_torch(case, pyrng, rng):
    geo = random_transposed(pyrng)
    g = geo["groups"]
    w = rand(rng, geo["c_in"], geo["c_out"] // g, *geo["kernel"])
    bias = rand(rng, geo["c_out"]) if case % 2 else None
    unbatched = case % 3 == 0
    shape = (geo["c_in"], *geo["size"]) if unbatched else (2, geo["c_in"], *geo["size"])
    x = rand(rng, *shape)

    def run(fn):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        bs = bias.clone().requires_grad_() if bias is not None else None
        out = fn(xs, ws, bs, *t_args(geo))
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(case), dtype=D)
        out.backward(upstream)
        return [out, xs.grad, ws.grad] + ([bs.grad] if bs is not None else [])

    want = run(F.conv_transpose2d)
    got = run(convt_ext.conv_transpose2d_as_conv2d)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert torch.allclose(a, b)


@pytest.mark.parametrize(
    "size, k, s, p, a, d",
    [
        ((1, 1), 1, 5, 2, 4, 1),  # the crop reaches past the stretched input into the high padding
        ((3, 4), 1, 1, 1, 0, 1),  # 1x1 kernel with padding: a pure crop
        ((6, 6), 3, 1, 3, 0, 1),  # p > d(k-1): negative padding on both sides
        ((3, 4), 2, 2, 3, 1, 2),
        ((3, 3), 3, 1, 0, 2, 3),  # output_padding >= stride, allowed by dilation
    ],
)
def test_conv_transpose2d_as_conv2d_crops(size, k, s, p, a, d, rng):
    x = rand(rng, 2, 2, *size)
    w = rand(rng, 2, 3, k, k)
    want = F.conv_transpose2d(x, w, None, s, p, a, 1, d)
    assert torch.allclose(convt_ext.conv_transpose2d_as_conv2d(x, w, None, s, p, a, 1, d), want)


def test_conv_transpose2d_as_conv2d_gradcheck(rng):
    x = rand(rng, 1, 4, 3, 2).requires_grad_()
    w = rand(rng, 4, 1, 2, 3).requires_grad_()
    b = rand(rng, 2).requires_grad_()
    args = ((2, 1), (1, 0), (1, 0), 2, (1, 2))
    fn = lambda x, w, b: convt_ext.conv_transpose2d_as_conv2d(x, w, b, *args)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_conv_transpose2d_as_conv2d_runs_the_recipe(monkeypatch, rng):
    """It goes through equivalent_conv2d and one stride-1 convt_ext.conv2d."""
    calls = {"equivalent": 0, "conv2d": []}
    real_eq, real_conv = matrix_module.equivalent_conv2d, matrix_module.conv2d

    def spy_eq(*args, **kwargs):
        calls["equivalent"] += 1
        return real_eq(*args, **kwargs)

    def spy_conv(input, weight, bias, stride, padding, dilation, groups):
        calls["conv2d"].append((stride, padding, dilation, groups))
        return real_conv(input, weight, bias, stride, padding, dilation, groups)

    monkeypatch.setattr(matrix_module, "equivalent_conv2d", spy_eq)
    monkeypatch.setattr(matrix_module, "conv2d", spy_conv)
    monkeypatch.setattr(F, "conv_transpose2d", None)
    x, w = rand(rng, 1, 4, 3, 3), rand(rng, 4, 1, 3, 3)
    out = convt_ext.conv_transpose2d_as_conv2d(x, w, None, 2, 1, 1, 2, 2)
    monkeypatch.undo()
    assert calls == {"equivalent": 1, "conv2d": [(1, 0, (2, 2), 2)]}
    assert torch.allclose(out, F.conv_transpose2d(x, w, None, 2, 1, 1, 2, 2))


@pytest.mark.parametrize("case", range(40))
def test_validity_matches_torch(case, pyrng, rng):
    """conv_transpose2d_as_conv2d raises ValueError exactly where
    F.conv_transpose2d refuses (output_padding, output size)."""
    k, s, d = pyrng.randint(1, 3), pyrng.randint(1, 3), pyrng.randint(1, 3)
    p, a, i = pyrng.randint(0, 4), pyrng.randint(0, 3), pyrng.randint(1, 3)
    x, w = rand(rng, 1, 2, i, i), rand(rng, 2, 1, k, k)
    try:
        want = F.conv_transpose2d(x, w, None, s, p, a, 1, d)
    except RuntimeError:
        want = None
    if want is None:
        with pytest.raises(ValueError):
            convt_ext.conv_transpose2d_as_conv2d(x, w, None, s, p, a, 1, d)
    else:
        assert torch.allclose(convt_ext.conv_transpose2d_as_conv2d(x, w, None, s, p, a, 1, d), want)


def test_conv_transpose2d_as_conv2d_rejects_bad_arguments(rng):
    x, w = rand(rng, 1, 4, 3, 3), rand(rng, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="output_padding"):
        convt_ext.conv_transpose2d_as_conv2d(x, w, None, 2, 0, 2)
    with pytest.raises(ValueError, match="channels"):
        convt_ext.conv_transpose2d_as_conv2d(x[:, :3], w)
    with pytest.raises(ValueError, match="groups"):
        convt_ext.conv_transpose2d_as_conv2d(x, w, groups=3)
    with pytest.raises(ValueError):
        convt_ext.conv_transpose2d_as_conv2d(x[0, 0], w)
    with pytest.raises(ValueError):
        convt_ext.conv_transpose2d_as_conv2d(x, w, padding=3)  # output size 5 - 6 + ... < 1
    with pytest.raises(TypeError):
        convt_ext.conv_transpose2d_as_conv2d(x, w, stride=1.5)


# ---------------------------------------------------------------- equivalent_conv2d


def test_equivalent_conv2d_fields(rng):
    c_in, c_out_g, g, k = 6, 2, 3, (3, 2)
    w = rand(rng, c_in, c_out_g, *k)
    eq = convt_ext.equivalent_conv2d(
        (2, c_in, 4, 5), w, stride=(2, 3), padding=(1, 2), output_padding=(1, 0), groups=g, dilation=(1, 2)
    )
    assert isinstance(eq, convt_ext.EquivalentConv2d)
    assert eq.input_size == (4, 5)
    assert eq.zero_insertion == (1, 2)
    assert eq.stretched_size == (7, 13)
    assert eq.padding_low == (1 * 2 - 1, 2 * 1 - 2)
    assert eq.padding_high == (1 * 2 - 1 + 1, 2 * 1 - 2 + 0)
    assert eq.dilation == (1, 2) and eq.groups == g
    ref = F.conv_transpose2d(rand(rng, 1, c_in, 4, 5), w, None, (2, 3), (1, 2), (1, 0), g, (1, 2))
    assert eq.output_size == tuple(ref.shape[-2:])
    # Rotated 180° with in/out channels swapped inside each group, entry by entry.
    c_in_g = c_in // g
    assert eq.weight.shape == (g * c_out_g, c_in_g, *k)
    for group in range(g):
        for i in range(c_in_g):
            for j in range(c_out_g):
                assert torch.equal(eq.weight[group * c_out_g + j, i], w[group * c_in_g + i, j].flip(0, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        eq.groups = 1
    for field in ("zero_insertion", "padding_low", "padding_high", "weight", "dilation", "output_size"):
        assert field in (convt_ext.EquivalentConv2d.__doc__ or "")


def test_equivalent_conv2d_accepts_sizes_shapes_and_tensors(rng):
    w = rand(rng, 2, 1, 3, 3)
    want = convt_ext.equivalent_conv2d((4, 4), w, 2).output_size
    assert want == (9, 9)
    assert convt_ext.equivalent_conv2d(4, w, 2).output_size == want
    assert convt_ext.equivalent_conv2d((2, 4, 4), w, 2).output_size == want
    assert convt_ext.equivalent_conv2d(torch.Size([3, 2, 4, 4]), w, 2).output_size == want
    assert convt_ext.equivalent_conv2d(torch.zeros(2, 4, 4), w, 2).output_size == want
    with pytest.raises(ValueError, match="channels"):
        convt_ext.equivalent_conv2d((3, 4, 4), w, 2)
    with pytest.raises(TypeError):
        convt_ext.equivalent_conv2d("4x4", w)


def test_equivalent_conv2d_prepare_shows_zero_insertion():
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=D)
    eq = convt_ext.equivalent_conv2d((1, 2, 2), torch.ones(1, 1, 3, 3, dtype=D), stride=2, padding=1, output_padding=1)
    want = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 1, 0, 2, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 3, 0, 4, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=D,
    )
    assert torch.equal(eq.prepare(y[None]), want[None])
    assert eq.padded_size == (6, 6) and eq.output_size == (4, 4)


# ---------------------------------------------------------------- the guide's figures

# FIGURES (convt_ext.figures): (figure, i, k, s, p, d, o), the direct convolutions
# of chapter 2 (and 5.1), whose transposes are figures 4.1-4.7, with o as printed in the guide.


def guide_direct_size(i, k, s, p, d):
    """Relationships 1-6 and 15, each in its own case, as the guide writes them."""
    if d > 1:
        return (i + 2 * p - k - (k - 1) * (d - 1)) // s + 1  # 15
    if s == 1 and p == 0:
        return (i - k) + 1  # 1
    if s == 1 and k % 2 == 1 and p == k // 2:
        return i  # 3: half padding
    if s == 1 and p == k - 1:
        return i + (k - 1)  # 4: full padding
    if s == 1:
        return (i - k) + 2 * p + 1  # 2
    if p == 0:
        return (i - k) // s + 1  # 5
    return (i + 2 * p - k) // s + 1  # 6


def guide_transposed_size(i, k, s, p, d, i_t):
    """o' by relationships 8-14 (and 14 with k -> d(k-1)+1 for dilation).
    Also returns the guide's p' (the equivalent direct conv's padding) and a."""
    if d > 1:
        k_eff = d * (k - 1) + 1
        a = (i + 2 * p - k_eff) % s
        return s * (i_t - 1) + a + k_eff - 2 * p, k_eff - p - 1, a
    if s == 1 and p == 0:
        return i_t + (k - 1), k - 1, 0  # 8
    if s == 1 and k % 2 == 1 and p == k // 2:
        return i_t, p, 0  # 10: half padding
    if s == 1 and p == k - 1:
        return i_t - (k - 1), 0, 0  # 11: full padding
    if s == 1:
        return i_t + (k - 1) - 2 * p, k - p - 1, 0  # 9
    if p == 0 and (i - k) % s == 0:
        return s * (i_t - 1) + k, k - 1, 0  # 12
    if (i + 2 * p - k) % s == 0:
        return s * (i_t - 1) + k - 2 * p, k - p - 1, 0  # 13
    a = (i + 2 * p - k) % s
    return s * (i_t - 1) + a + k - 2 * p, k - p - 1, a  # 14


@pytest.mark.parametrize("figure", FIGURES, ids=[f[0].split()[0] for f in FIGURES])
def test_guide_figures(figure, rng):
    _, i, k, s, p, d, o = figure
    assert guide_direct_size(i, k, s, p, d) == o
    x = rand(rng, 1, 1, i, i)
    w = rand(rng, 1, 1, k, k)
    y = convt_ext.conv2d(x, w, None, s, p, d)
    assert y.shape[-2:] == (o, o) == F.conv2d(x, w, None, s, p, d).shape[-2:]

    o_t, p_t, a = guide_transposed_size(i, k, s, p, d, o)
    assert o_t == i  # each transposed figure maps o x o back to i x i
    assert convt_ext.output_padding_for(o, i, k, s, p, d) == a
    z = convt_ext.conv_transpose2d(y, w, None, s, p, a, 1, d)
    z_ref = F.conv_transpose2d(y, w, None, s, p, a, 1, d)
    assert z.shape[-2:] == (o_t, o_t) == z_ref.shape[-2:]
    assert torch.allclose(z, z_ref)
    assert torch.allclose(convt_ext.conv_transpose2d_as_conv2d(y, w, None, s, p, a, 1, d), z_ref)

    # The guide's equivalent direct convolution: k' = k, s' = 1, p' = k - p - 1
    # (d(k-1) - p with dilation), s - 1 zeros inserted, a more zeros bottom/right.
    eq = convt_ext.equivalent_conv2d((o, o), w, s, p, a, 1, d)
    assert eq.zero_insertion == (s - 1, s - 1)
    assert eq.padding_low == (p_t, p_t)
    assert eq.padding_high == (p_t + a, p_t + a)
    assert eq.output_size == (o_t, o_t)
    assert eq.weight.shape[-2:] == (k, k)


# ---------------------------------------------------------------- output_padding_for


def torch_output_size(i, k, s, p, a, d):
    try:
        return F.conv_transpose2d(torch.zeros(1, 1, i, i, dtype=D), torch.zeros(1, 1, k, k, dtype=D), None, s, p, a, 1, d).shape[-1]
    except RuntimeError:
        return None


@pytest.mark.parametrize("case", range(30))
def test_output_padding_for_round_trip(case, pyrng):
    while True:
        i, k, s, d = pyrng.randint(1, 6), pyrng.randint(1, 4), pyrng.randint(1, 4), pyrng.randint(1, 3)
        p, a = pyrng.randint(0, 3), pyrng.randrange(max(s, d))
        o = torch_output_size(i, k, s, p, a, d)
        if o is not None:
            break
    assert convt_ext.output_padding_for(i, o, k, s, p, d) == a
    assert convt_ext.output_padding_for((i, i), (o, o), (k, k), (s, s), (p, p), (d, d)) == (a, a)
    assert convt_ext.output_padding_for((i, 1), (o, k), k, (s, 1), (p, 0), (d, 1)) == (a, 0)


@pytest.mark.parametrize("case", range(15))
def test_output_padding_for_unreachable_lists_reachable_sizes(case, pyrng):
    reachable = []
    while not reachable:
        i, k, s, d, p = pyrng.randint(1, 6), pyrng.randint(1, 4), pyrng.randint(1, 4), pyrng.randint(1, 3), pyrng.randint(0, 2)
        reachable = [o for o in (torch_output_size(i, k, s, p, a, d) for a in range(max(s, d))) if o is not None]
    for target in (max(reachable) + 1, max(reachable) + 1 + pyrng.randint(0, 5), min(reachable) - 1):
        if target < 1:
            continue
        with pytest.raises(ValueError) as info:
            convt_ext.output_padding_for(i, target, k, s, p, d)
        listed = re.search(r"reachable output sizes are \[([0-9, ]*)\]", str(info.value))
        assert listed, str(info.value)
        assert [int(v) for v in listed.group(1).split(",") if v.strip()] == reachable


def test_output_padding_for_examples():
    # Figure 4.7: 3 -> 6 needs a = 1; 3 -> 5 needs a = 0; 3 -> 7 is impossible.
    assert convt_ext.output_padding_for(3, 6, 3, 2, 1, 1) == 1
    assert convt_ext.output_padding_for(3, 5, 3, 2, 1, 1) == 0
    with pytest.raises(ValueError, match=r"\[5, 6\]"):
        convt_ext.output_padding_for(3, 7, 3, 2, 1, 1)
    # Dilation 3 > stride 1 allows a = 0, 1, 2.
    assert convt_ext.output_padding_for(3, 11, 3, 1, 0, 3) == 2
    with pytest.raises(ValueError, match="width"):
        convt_ext.output_padding_for((3, 3), (6, 9), 3, 2, 1, 1)
    with pytest.raises(ValueError):
        convt_ext.output_padding_for(3, 6, 3, 0, 1, 1)
    with pytest.raises(ValueError):
        convt_ext.output_padding_for(3, 0, 3, 2, 2, 1)
    with pytest.raises(TypeError):
        convt_ext.output_padding_for(3, 6.0, 3, 2, 1, 1)


# ---------------------------------------------------------------- 1-d and 3-d
#
# The same relations in one and three spatial dimensions, against F.conv1d /
# F.conv3d / F.conv_transpose1d / F.conv_transpose3d in float64. Sizes stay
# small in 3-d so that the dense references (one unit image per input pixel)
# stay cheap.

CONV_ND = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T_ND = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
ND = [1, 3]


def prod(values):
    out = 1
    for v in values:
        out *= v
    return out


def random_conv_nd(pyrng, dims):
    """A random valid direct-convolution geometry with `dims` spatial dimensions."""
    top = 9 if dims == 1 else 5
    while True:
        g = pyrng.choice([1, 1, 2])
        geo = dict(
            groups=g,
            c_in=g * pyrng.randint(1, 2),
            c_out=g * pyrng.randint(1, 2),
            kernel=tuple(pyrng.randint(1, 3) for _ in range(dims)),
            stride=tuple(pyrng.randint(1, 3) for _ in range(dims)),
            padding=tuple(pyrng.randint(0, 2) for _ in range(dims)),
            dilation=tuple(pyrng.randint(1, 2) for _ in range(dims)),
            size=tuple(pyrng.randint(1, top) for _ in range(dims)),
        )
        span = [geo["size"][i] + 2 * geo["padding"][i] - geo["dilation"][i] * (geo["kernel"][i] - 1) for i in range(dims)]
        if min(span) >= 1:
            return geo


def random_transposed_nd(pyrng, dims):
    """A random geometry that F.conv_transpose{1,3}d accepts, output_padding anywhere in
    [0, max(stride, dilation))."""
    while True:
        g = pyrng.choice([1, 1, 2])
        s = tuple(pyrng.randint(1, 3) for _ in range(dims))
        d = tuple(pyrng.randint(1, 2) for _ in range(dims))
        geo = dict(
            groups=g,
            c_in=g * pyrng.randint(1, 2),
            c_out=g * pyrng.randint(1, 2),
            kernel=tuple(pyrng.randint(1, 3) for _ in range(dims)),
            stride=s,
            padding=tuple(pyrng.randint(0, 2) for _ in range(dims)),
            output_padding=tuple(pyrng.randrange(max(s[i], d[i])) for i in range(dims)),
            dilation=d,
            size=tuple(pyrng.randint(1, 5 if dims == 1 else 3) for _ in range(dims)),
        )
        out = [
            (geo["size"][i] - 1) * s[i] - 2 * geo["padding"][i] + d[i] * (geo["kernel"][i] - 1) + geo["output_padding"][i] + 1
            for i in range(dims)
        ]
        if min(out) >= 1:
            return geo


def dense_reference_nd(w, geo):
    """C from F.conv{1,3}d applied to every unit image (the test's reference only)."""
    dims = len(geo["size"])
    n = geo["c_in"] * prod(geo["size"])
    basis = torch.eye(n, dtype=D).view(n, geo["c_in"], *geo["size"])
    out = CONV_ND[dims](basis, w, None, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    return out.reshape(n, -1).t()


def one_hot_unfold(x, kernel, dilation, padding, stride):
    """im2col's columns (N, C*prod(kernel), L) from torch: a grouped F.conv{1,2,3}d whose
    kernels are one-hot, one per kernel offset (row-major), for every channel."""
    dims, c = len(kernel), x.shape[1]
    k = prod(kernel)
    one_hot = torch.eye(k, dtype=x.dtype).view(k, 1, *kernel).repeat(c, 1, *[1] * dims)
    return CONV_ND[dims](x, one_hot, None, stride, padding, dilation, c).flatten(2)


@pytest.mark.parametrize("dims", ND)
@pytest.mark.parametrize("case", range(6))
def test_conv_matrix_nd_random(dims, case, pyrng, rng):
    geo = random_conv_nd(pyrng, dims)
    k, g = geo["kernel"], geo["groups"]
    w = rand(rng, geo["c_out"], geo["c_in"] // g, *k)
    s, p, d = geo["stride"], geo["padding"], geo["dilation"]
    C = convt_ext.conv_matrix(w, geo["size"], s, p, d, g)
    x = rand(rng, geo["c_in"], *geo["size"])
    y_ref = CONV_ND[dims](x[None], w, None, s, p, d, g)
    out_size = y_ref.shape[2:]
    assert C.layout == torch.sparse_coo and C.is_coalesced() and C.dtype == D
    assert C.shape == (geo["c_out"] * prod(out_size), geo["c_in"] * prod(geo["size"]))
    assert torch.allclose(C.to_dense(), dense_reference_nd(w, geo))
    assert torch.allclose(C @ x.flatten(), y_ref.flatten())
    a = [(geo["size"][i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) % s[i] for i in range(dims)]
    y = rand(rng, geo["c_out"], *out_size)
    ref = CONV_T_ND[dims](y[None], w, None, s, p, a, g, d)
    assert tuple(ref.shape[2:]) == tuple(geo["size"])
    assert torch.allclose(C.t() @ y.flatten(), ref.flatten())


def test_conv_matrix_nd_ints_and_errors(rng):
    w1, w3 = rand(rng, 2, 1, 3), rand(rng, 2, 2, 2, 1, 2)
    x1, x3 = rand(rng, 2, 7), rand(rng, 4, 3, 4, 3)
    C1 = convt_ext.conv_matrix(w1, 7, stride=2, padding=1, groups=2)
    assert torch.allclose(C1 @ x1.flatten(), F.conv1d(x1[None], w1, None, 2, 1, 1, 2).flatten())
    C3 = convt_ext.conv_matrix(w3, (3, 4, 3), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1), groups=2)
    ref = F.conv3d(x3[None], w3, None, (1, 2, 1), (1, 0, 1), (2, 1, 1), 2)
    assert torch.allclose(C3 @ x3.flatten(), ref.flatten())
    with pytest.raises(ValueError, match="input_size"):
        convt_ext.conv_matrix(w3, (3, 4))  # a 2-d size for a 3-d convolution
    with pytest.raises(ValueError, match="input_size"):
        convt_ext.conv_matrix(w1, (7, 7))
    with pytest.raises(ValueError, match="weight"):
        convt_ext.conv_matrix(rand(rng, 1, 1, 1, 1, 1, 1), 3)  # 4 spatial dimensions
    with pytest.raises(ValueError):
        convt_ext.conv_matrix(w1, 1)  # 3-tap kernel over 1 pixel
    with pytest.raises(TypeError):
        convt_ext.conv_matrix(w3, 4, stride=(1, 1))


def test_conv_matrix_nd_is_differentiable_in_the_weight(rng):
    w = rand(rng, 2, 1, 2, 1, 2).requires_grad_()
    x = rand(rng, 1, 3, 2, 4)
    C = convt_ext.conv_matrix(w, (3, 2, 4), stride=(1, 1, 2), padding=(0, 1, 0))
    u = rand(rng, C.shape[0])
    (got,) = torch.autograd.grad(torch.dot(C @ x.flatten(), u), w)
    w_ref = w.detach().clone().requires_grad_()
    y = F.conv3d(x[None], w_ref, None, (1, 1, 2), (0, 1, 0))
    (want,) = torch.autograd.grad(y, w_ref, u.view_as(y))
    assert torch.allclose(got, want)


@pytest.mark.parametrize("dims", ND)
@pytest.mark.parametrize("case", range(6))
def test_im2col_matrix_nd_is_a_one_hot_convolution(dims, case, pyrng, rng):
    geo = random_conv_nd(pyrng, dims)
    k, d, p, s = geo["kernel"], geo["dilation"], geo["padding"], geo["stride"]
    U = convt_ext.im2col_matrix(geo["size"], k, d, p, s)
    assert U.layout == torch.sparse_coo and U.is_coalesced() and U.dtype == torch.float64
    pixels = prod(geo["size"])
    # Column `pixel` of U is the unfolding of the unit image at `pixel`.
    basis = torch.eye(pixels, dtype=D).view(pixels, 1, *geo["size"])
    want = one_hot_unfold(basis, k, d, p, s).reshape(pixels, -1).t()
    assert U.shape == want.shape
    assert torch.equal(U.to_dense(), want)
    assert torch.equal(U.coalesce().values(), torch.ones(U._nnz(), dtype=D))
    # The library's N-d im2col/col2im are U and U^T.
    x = rand(rng, 1, 1, *geo["size"])
    cols = convt_ext.im2col(x, k, d, p, s)
    assert torch.allclose(cols.flatten(), U @ x.flatten())
    assert torch.allclose(cols, one_hot_unfold(x, k, d, p, s))
    c = rand(rng, *cols.shape)
    assert torch.allclose(convt_ext.col2im(c, geo["size"], k, d, p, s).flatten(), U.t() @ c.flatten())


def test_im2col_matrix_nd_arguments():
    # 1-d from a 1-tuple; ints elsewhere are repeated once.
    U = convt_ext.im2col_matrix((5,), 3, padding=1)
    assert U.shape == (3 * 5, 5) and U._nnz() == 3 * 5 - 2
    U3 = convt_ext.im2col_matrix((2, 3, 4), (1, 2, 3), stride=(1, 1, 2), dtype=torch.float32)
    assert U3.dtype == torch.float32 and U3.shape == (6 * 2 * 2 * 1, 24)
    assert U3._nnz() == U3.shape[0]  # no padding: every tap lands inside
    with pytest.raises(TypeError):
        convt_ext.im2col_matrix((4, 4, 4, 4), 1)  # 4 spatial dimensions
    with pytest.raises(TypeError):
        convt_ext.im2col_matrix((4, 4, 4), (3, 3))  # kernel_size of the wrong length
    with pytest.raises(ValueError):
        convt_ext.im2col_matrix((4,), 5)


@pytest.mark.parametrize("dims", ND)
@pytest.mark.parametrize("case", range(8))
def test_conv_transpose_nd_as_conv_nd_matches_torch(dims, case, pyrng, rng):
    geo = random_transposed_nd(pyrng, dims)
    g = geo["groups"]
    w = rand(rng, geo["c_in"], geo["c_out"] // g, *geo["kernel"])
    bias = rand(rng, geo["c_out"]) if case % 2 else None
    unbatched = case % 3 == 0
    shape = (geo["c_in"], *geo["size"]) if unbatched else (2, geo["c_in"], *geo["size"])
    x = rand(rng, *shape)
    ours = getattr(convt_ext, f"conv_transpose{dims}d_as_conv{dims}d")

    def run(fn):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        bs = bias.clone().requires_grad_() if bias is not None else None
        out = fn(xs, ws, bs, *t_args(geo))
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(case), dtype=D)
        out.backward(upstream)
        return [out, xs.grad, ws.grad] + ([bs.grad] if bs is not None else [])

    want = run(CONV_T_ND[dims])
    got = run(ours)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert torch.allclose(a, b)


@pytest.mark.parametrize("dims", ND)
def test_conv_transpose_nd_as_conv_nd_gradcheck(dims, rng):
    size = (3,) if dims == 1 else (2, 1, 2)
    x = rand(rng, 1, 2, *size).requires_grad_()
    w = rand(rng, 2, 1, *[2] * dims).requires_grad_()
    b = rand(rng, 2).requires_grad_()
    args = ((2,) * dims, (1,) + (0,) * (dims - 1), (1,) + (0,) * (dims - 1), 2, (1,) * (dims - 1) + (2,))
    ours = getattr(convt_ext, f"conv_transpose{dims}d_as_conv{dims}d")
    fn = lambda x, w, b: ours(x, w, b, *args)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("dims", ND)
def test_conv_transpose_nd_as_conv_nd_runs_the_recipe(dims, monkeypatch, rng):
    """It goes through equivalent_conv{1,3}d and one stride-1 convt_ext.conv{1,3}d."""
    calls = {"equivalent": 0, "conv": []}
    real_eq = getattr(matrix_module, f"equivalent_conv{dims}d")
    real_conv = getattr(matrix_module, f"conv{dims}d")

    def spy_eq(*args, **kwargs):
        calls["equivalent"] += 1
        return real_eq(*args, **kwargs)

    def spy_conv(input, weight, bias, stride, padding, dilation, groups):
        calls["conv"].append((stride, padding, dilation, groups))
        return real_conv(input, weight, bias, stride, padding, dilation, groups)

    monkeypatch.setattr(matrix_module, f"equivalent_conv{dims}d", spy_eq)
    monkeypatch.setattr(matrix_module, f"conv{dims}d", spy_conv)
    monkeypatch.setattr(F, f"conv_transpose{dims}d", None)
    x, w = rand(rng, 1, 4, *[3] * dims), rand(rng, 4, 1, *[3] * dims)
    out = getattr(convt_ext, f"conv_transpose{dims}d_as_conv{dims}d")(x, w, None, 2, 1, 1, 2, 2)
    monkeypatch.undo()
    assert calls == {"equivalent": 1, "conv": [(1, 0, (2,) * dims, 2)]}
    assert torch.allclose(out, CONV_T_ND[dims](x, w, None, 2, 1, 1, 2, 2))


@pytest.mark.parametrize("dims", ND)
@pytest.mark.parametrize("case", range(8))
def test_validity_nd_matches_torch(dims, case, pyrng, rng):
    """conv_transpose{1,3}d_as_conv{1,3}d raise ValueError exactly where torch refuses."""
    k, s, d = pyrng.randint(1, 3), pyrng.randint(1, 3), pyrng.randint(1, 3)
    p, a, i = pyrng.randint(0, 4), pyrng.randint(0, 3), pyrng.randint(1, 3)
    x, w = rand(rng, 1, 2, *[i] * dims), rand(rng, 2, 1, *[k] * dims)
    ours = getattr(convt_ext, f"conv_transpose{dims}d_as_conv{dims}d")
    try:
        want = CONV_T_ND[dims](x, w, None, s, p, a, 1, d)
    except RuntimeError:
        want = None
    if want is None:
        with pytest.raises(ValueError):
            ours(x, w, None, s, p, a, 1, d)
    else:
        assert torch.allclose(ours(x, w, None, s, p, a, 1, d), want)


def test_conv_transpose_nd_as_conv_nd_rejects_bad_arguments(rng):
    x1, w1 = rand(rng, 1, 4, 3), rand(rng, 4, 2, 3)
    x3, w3 = rand(rng, 1, 4, 3, 3, 3), rand(rng, 4, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="output_padding"):
        convt_ext.conv_transpose1d_as_conv1d(x1, w1, None, 2, 0, 2)
    with pytest.raises(ValueError, match="channels"):
        convt_ext.conv_transpose3d_as_conv3d(x3[:, :3], w3)
    with pytest.raises(ValueError, match="groups"):
        convt_ext.conv_transpose3d_as_conv3d(x3, w3, groups=3)
    with pytest.raises(ValueError, match="input must be 2-d"):
        convt_ext.conv_transpose1d_as_conv1d(x1[0, 0], w1)
    with pytest.raises(ValueError, match="input must be 4-d"):
        convt_ext.conv_transpose3d_as_conv3d(x3[0, 0], w3)
    with pytest.raises(ValueError, match="weight must be 5-d"):
        convt_ext.conv_transpose3d_as_conv3d(x3, w3[..., 0])
    with pytest.raises(ValueError, match="weight must be 3-d"):
        convt_ext.equivalent_conv1d(4, w3)
    with pytest.raises(TypeError):
        convt_ext.conv_transpose3d_as_conv3d(x3, w3, stride=(1, 1))


def test_equivalent_conv3d_fields(rng):
    c_in, c_out_g, g, k = 4, 3, 2, (3, 2, 1)
    w = rand(rng, c_in, c_out_g, *k)
    eq = convt_ext.equivalent_conv3d(
        (1, c_in, 2, 4, 3), w, stride=(2, 1, 3), padding=(1, 2, 0), output_padding=(1, 0, 2), groups=g, dilation=(1, 2, 1)
    )
    assert isinstance(eq, convt_ext.EquivalentConv3d) and isinstance(eq, convt_ext.EquivalentConv)
    assert not isinstance(eq, convt_ext.EquivalentConv2d)
    assert eq.input_size == (2, 4, 3)
    assert eq.zero_insertion == (1, 0, 2)
    assert eq.stretched_size == (3, 4, 7)
    assert eq.padding_low == (1 * 2 - 1, 2 * 1 - 2, 0 - 0)
    assert eq.padding_high == (1 * 2 - 1 + 1, 2 * 1 - 2 + 0, 0 - 0 + 2)
    assert eq.dilation == (1, 2, 1) and eq.groups == g
    ref = F.conv_transpose3d(rand(rng, 1, c_in, 2, 4, 3), w, None, (2, 1, 3), (1, 2, 0), (1, 0, 2), g, (1, 2, 1))
    assert eq.output_size == tuple(ref.shape[2:])
    assert eq.padded_size == tuple(eq.stretched_size[i] + eq.padding_low[i] + eq.padding_high[i] for i in range(3))
    # Reversed along every axis, in/out channels swapped inside each group, entry by entry.
    c_in_g = c_in // g
    assert eq.weight.shape == (g * c_out_g, c_in_g, *k)
    for group in range(g):
        for i in range(c_in_g):
            for j in range(c_out_g):
                assert torch.equal(eq.weight[group * c_out_g + j, i], w[group * c_in_g + i, j].flip(0, 1, 2))
    assert repr(eq).startswith("EquivalentConv3d(input_size=(2, 4, 3), ")
    with pytest.raises(dataclasses.FrozenInstanceError):
        eq.groups = 1
    for cls in (convt_ext.EquivalentConv, convt_ext.EquivalentConv1d, convt_ext.EquivalentConv3d):
        for field in ("zero_insertion", "padding_low", "padding_high", "weight", "dilation", "output_size"):
            assert field in (cls.__doc__ or ""), (cls, field)


def test_equivalent_conv1d_prepare_shows_zero_insertion():
    y = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    eq = convt_ext.equivalent_conv1d((1, 3), torch.ones(1, 1, 3, dtype=D), stride=3, padding=1, output_padding=2)
    assert isinstance(eq, convt_ext.EquivalentConv1d)
    want = torch.tensor([[0, 1, 0, 0, 2, 0, 0, 3, 0, 0, 0]], dtype=D)
    assert torch.equal(eq.prepare(y[None])[0], want)
    assert eq.padded_size == (11,) and eq.output_size == (9,)


@pytest.mark.parametrize("dims", ND)
def test_equivalent_conv_nd_accepts_sizes_shapes_and_tensors(dims, rng):
    fn = getattr(convt_ext, f"equivalent_conv{dims}d")
    w = rand(rng, 2, 1, *[3] * dims)
    want = fn((4,) * dims, w, 2).output_size
    assert want == (9,) * dims
    assert fn(4, w, 2).output_size == want
    assert fn((2,) + (4,) * dims, w, 2).output_size == want
    assert fn(torch.Size((3, 2) + (4,) * dims), w, 2).output_size == want
    assert fn(torch.zeros(2, *[4] * dims), w, 2).output_size == want
    with pytest.raises(ValueError, match="channels"):
        fn((3,) + (4,) * dims, w, 2)
    with pytest.raises(TypeError):
        fn((4,) * (dims + 3), w)
    with pytest.raises(TypeError):
        fn("4", w)


@pytest.mark.parametrize("dims", ND)
@pytest.mark.parametrize("figure", FIGURES, ids=[f[0].split()[0] for f in FIGURES])
def test_guide_figures_nd(figure, dims, rng):
    """The guide's figures hold along every axis, in 1-d and 3-d too."""
    _, i, k, s, p, d, o = figure
    x = rand(rng, 1, 1, *[i] * dims)
    w = rand(rng, 1, 1, *[k] * dims)
    y = CONV_ND[dims](x, w, None, s, p, d)
    assert tuple(y.shape[2:]) == (o,) * dims
    o_t, p_t, a = guide_transposed_size(i, k, s, p, d, o)
    assert convt_ext.output_padding_for((o,) * dims, (i,) * dims, k, s, p, d) == (a,) * dims
    z_ref = CONV_T_ND[dims](y, w, None, s, p, a, 1, d)
    assert tuple(z_ref.shape[2:]) == (o_t,) * dims
    ours = getattr(convt_ext, f"conv_transpose{dims}d_as_conv{dims}d")
    assert torch.allclose(ours(y, w, None, s, p, a, 1, d), z_ref)
    eq = getattr(convt_ext, f"equivalent_conv{dims}d")((o,) * dims, w, s, p, a, 1, d)
    assert eq.zero_insertion == (s - 1,) * dims
    assert eq.padding_low == (p_t,) * dims
    assert eq.padding_high == (p_t + a,) * dims
    assert eq.output_size == (o_t,) * dims


def test_output_padding_for_nd():
    # Figure 4.7 along every axis of a 3-d image, and a mixed geometry.
    assert convt_ext.output_padding_for((3, 3, 3), (6, 5, 6), 3, 2, 1, 1) == (1, 0, 1)
    assert convt_ext.output_padding_for((3,), (6,), 3, 2, 1, 1) == (1,)
    assert convt_ext.output_padding_for(3, 11, (3,), 1, 0, 3) == (2,)
    args = ((2, 3, 4), (3, 2, 2), (1, 2, 3), (1, 2, 1), (0, 1, 1))
    for a in ((0, 1, 0), (0, 0, 0)):
        want = F.conv_transpose3d(
            torch.zeros(1, 1, 2, 3, 4, dtype=D), torch.zeros(1, 1, 3, 2, 2, dtype=D), None, (1, 2, 3), (0, 1, 1), a, 1, (1, 2, 1)
        ).shape[2:]
        i, _, k, s, d, p = args[0], None, args[1], args[2], args[3], args[4]
        assert convt_ext.output_padding_for(i, tuple(want), k, s, p, d) == a
    with pytest.raises(ValueError, match="along depth"):
        convt_ext.output_padding_for((3, 3, 3), (7, 6, 6), 3, 2, 1, 1)
    with pytest.raises(ValueError, match=r"along length.*\[5, 6\]"):
        convt_ext.output_padding_for((3,), (7,), 3, 2, 1, 1)
    with pytest.raises(TypeError):
        convt_ext.output_padding_for((3, 3, 3), (6, 6), 3, 2, 1, 1)  # lengths disagree
    with pytest.raises(TypeError):
        convt_ext.output_padding_for((3,) * 4, (6,) * 4, 3, 2, 1, 1)


def test_product_layout_3d_is_kronecker_of_1d(rng):
    """docs/relationships.md: the 3-d U is the Kronecker product of the three 1-d U's with its
    rows reordered from (j0, o0, j1, o1, j2, o2) to (j0, j1, j2, o0, o1, o2); for one channel
    and a separable kernel, C is the Kronecker product of the 1-d C's."""
    size, k, s, p, d = (3, 4, 5), (2, 3, 2), (1, 2, 2), (1, 0, 1), (2, 1, 1)
    U = convt_ext.im2col_matrix(size, k, d, p, s).to_dense()
    U1 = [convt_ext.im2col_matrix((size[a],), (k[a],), (d[a],), (p[a],), (s[a],)).to_dense() for a in range(3)]
    o = [U1[a].shape[0] // k[a] for a in range(3)]
    kron = torch.kron(torch.kron(U1[0], U1[1]), U1[2])
    kron = kron.view(k[0], o[0], k[1], o[1], k[2], o[2], -1).permute(0, 2, 4, 1, 3, 5, 6).reshape(U.shape)
    assert torch.equal(U, kron)
    factors = [rand(rng, k[a]) for a in range(3)]
    w = torch.einsum("i,j,k->ijk", *factors)[None, None]
    C = convt_ext.conv_matrix(w, size, s, p, d).to_dense()
    C1 = [convt_ext.conv_matrix(factors[a][None, None], (size[a],), (s[a],), (p[a],), (d[a],)).to_dense() for a in range(3)]
    assert torch.allclose(C, torch.kron(torch.kron(C1[0], C1[1]), C1[2]))
    assert torch.allclose(C, dense_reference_nd(w, dict(size=size, c_in=1, stride=s, padding=p, dilation=d, groups=1)))


def test_docs_example_1d():
    """docs/relationships.md: w = [1, 2, 3] over 5 pixels, C, C C^T, and C^T y the full convolution."""
    w = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=D)
    C = convt_ext.conv_matrix(w, (5,)).to_dense()
    assert torch.equal(C, torch.tensor([[1, 2, 3, 0, 0], [0, 1, 2, 3, 0], [0, 0, 1, 2, 3]], dtype=D))
    assert torch.equal(C @ C.t(), torch.tensor([[14, 8, 3], [8, 14, 8], [3, 8, 14]], dtype=D))
    y = torch.ones(1, 1, 3, dtype=D)
    assert torch.equal(F.conv_transpose1d(y, w).flatten(), torch.tensor([1, 3, 6, 5, 3], dtype=D))
    assert torch.equal(C.t() @ y.flatten(), F.conv_transpose1d(y, w).flatten())
    C3 = convt_ext.conv_matrix(torch.ones(1, 1, 3, 3, 3, dtype=D), (4, 4, 4))
    assert C3.shape == (8, 64) and C3._nnz() == 8 * 27
