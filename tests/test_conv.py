"""conv2d / conv_transpose2d / conv2d_weight (the convolutions): parity with
F.conv2d / F.conv_transpose2d / torch.nn.grad.conv2d_weight in value and
gradient, gradcheck, opcheck, torch.compile, the workspace limit, the wide-GEMM
and per-sample paths, dtypes and argument errors.

All expected values come from torch.nn.functional / torch.nn.grad."""
import os
import random
import re
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.grad import conv2d_weight as torch_conv2d_weight

import convt_ext
from conftest import DEFAULT_WORKSPACE_LIMIT, LAYOUTS, assert_unchanged, make_tensor, randn, requires_cuda
from tf32_bounds import check_within, reference

ops = torch.ops.convt_ext

F64 = dict(rtol=1e-10, atol=1e-10)


def window_count(size, k, s, p, d):
    span = size + 2 * p - d * (k - 1) - 1
    return span // s + 1 if span >= 0 else 0


def transposed_size(size, k, s, p, op, d):
    return (size - 1) * s - 2 * p + d * (k - 1) + op + 1


def _seed(text):
    return zlib.crc32(text.encode())


# ------------------------------------------------------------------ case generation


def _conv2d_cases(n, seed):
    r = random.Random(seed)
    cases = []
    batches = [0, 1, 2, 3, None]
    paddings = ["int", "int", "int", "int", "same", "valid"]
    while len(cases) < n:
        g = r.randint(1, 3)
        cin, cout = g * r.randint(1, 2), g * r.randint(1, 2)
        k = (r.randint(1, 4), r.randint(1, 4))
        s = (r.randint(1, 3), r.randint(1, 3))
        d = (r.randint(1, 3), r.randint(1, 3))
        hw = (r.randint(1, 12), r.randint(1, 12))
        kind = paddings[len(cases) % len(paddings)]
        if kind == "int":
            p = (r.randint(0, 3), r.randint(0, 3))
        elif kind == "same":
            p, s = "same", (1, 1)
        else:
            p = "valid"
        pp = (0, 0) if p in ("same", "valid") else p
        if p != "same" and any(window_count(hw[i], k[i], s[i], pp[i], d[i]) < 1 for i in range(2)):
            continue
        batch = batches[len(cases) % len(batches)]
        bias = r.random() < 0.5
        layout = LAYOUTS[r.randrange(len(LAYOUTS))]
        cases.append(dict(batch=batch, cin=cin, cout=cout, groups=g, hw=hw, k=k, s=s, p=p, d=d, bias=bias, layout=layout))
    return cases


def _valid_transposed(hw, k, s, p, op, d):
    return all(op[i] < max(s[i], d[i]) and transposed_size(hw[i], k[i], s[i], p[i], op[i], d[i]) >= 1 for i in range(2))


def _conv_transpose2d_cases(n, seed):
    r = random.Random(seed)
    cases = []
    batches = [0, 1, 2, 3, None]
    while len(cases) < n:
        g = r.randint(1, 3)
        cin, cout = g * r.randint(1, 2), g * r.randint(1, 2)
        k = (r.randint(1, 4), r.randint(1, 4))
        s = (r.randint(1, 3), r.randint(1, 3))
        d = (r.randint(1, 3), r.randint(1, 3))
        p = (r.randint(0, 3), r.randint(0, 3))
        op = (r.randrange(max(s[0], d[0])), r.randrange(max(s[1], d[1])))
        hw = (r.randint(1, 12), r.randint(1, 12))
        if not _valid_transposed(hw, k, s, p, op, d):
            continue
        batch = batches[len(cases) % len(batches)]
        bias = r.random() < 0.5
        layout = LAYOUTS[r.randrange(len(LAYOUTS))]
        cases.append(dict(batch=batch, cin=cin, cout=cout, groups=g, hw=hw, k=k, s=s, p=p, op=op, d=d, bias=bias, layout=layout))
    return cases


def _all_output_padding_cases(seed):
    """Every (stride, dilation, output_padding) combination with stride and
    dilation in 1..3 and 0 <= output_padding < max(stride, dilation), in each
    of the two dimensions, with random other parameters."""
    r = random.Random(seed)
    combos = [(s, d, op) for s in (1, 2, 3) for d in (1, 2, 3) for op in range(max(s, d))]
    rows = combos[:]
    cols = combos[:]
    r.shuffle(cols)
    cases = []
    for (sh, dh, oph), (sw, dw, opw) in zip(rows, cols):
        while True:
            g = r.randint(1, 2)
            k = (r.randint(1, 4), r.randint(1, 4))
            p = (r.randint(0, 2), r.randint(0, 2))
            hw = (r.randint(1, 6), r.randint(1, 6))
            s, d, op = (sh, sw), (dh, dw), (oph, opw)
            if _valid_transposed(hw, k, s, p, op, d):
                break
        cases.append(
            dict(batch=2, cin=g * 2, cout=g, groups=g, hw=hw, k=k, s=s, p=p, op=op, d=d, bias=r.random() < 0.5, layout="contiguous")
        )
    return cases


CONV2D_CASES = _conv2d_cases(200, seed=1)
CONVT_CASES = _conv_transpose2d_cases(170, seed=2)
CONVT_OP_CASES = _all_output_padding_cases(seed=3)


def computing(cases):
    """The cases with data (a non-empty or absent batch): subsets taken from
    these always compute, whatever the period of the sweep's batch cycle."""
    return [c for c in cases if c["batch"] != 0]


def test_subsets_compute():
    for cases in (CONV2D_CASES, CONVT_CASES + CONVT_OP_CASES):
        subset = computing(cases)[::5]
        assert len(subset) >= 30 and all(c["batch"] != 0 for c in subset)
        assert {1, 2} <= {c["groups"] for c in subset}


def _id(case):
    b = "u" if case["batch"] is None else f"n{case['batch']}"
    p = case["p"] if isinstance(case["p"], str) else f"{case['p'][0]}{case['p'][1]}"
    op = f"-op{case['op'][0]}{case['op'][1]}" if "op" in case else ""
    return (
        f"{b}-g{case['groups']}-c{case['cin']}to{case['cout']}-{case['hw'][0]}x{case['hw'][1]}-k{case['k'][0]}{case['k'][1]}"
        f"-s{case['s'][0]}{case['s'][1]}-p{p}-d{case['d'][0]}{case['d'][1]}{op}-{'b' if case['bias'] else 'nb'}-{case['layout']}"
    )


def test_sweeps_cover_the_product():
    seen = {key: set() for key in ("groups", "k", "s", "p", "d", "hw", "batch", "bias", "layout")}
    for case in CONV2D_CASES + CONVT_CASES:
        seen["groups"].add(case["groups"])
        seen["k"].update(case["k"])
        seen["s"].update(case["s"])
        seen["d"].update(case["d"])
        seen["hw"].update(case["hw"])
        seen["batch"].add(case["batch"])
        seen["bias"].add(case["bias"])
        seen["layout"].add(case["layout"])
        seen["p"].update([case["p"]] if isinstance(case["p"], str) else case["p"])
    assert seen["groups"] == {1, 2, 3}
    assert seen["k"] == {1, 2, 3, 4}
    assert seen["s"] == seen["d"] == {1, 2, 3}
    assert seen["p"] == {0, 1, 2, 3, "same", "valid"}
    assert seen["hw"] == set(range(1, 13))
    assert seen["batch"] == {0, 1, 2, 3, None}
    assert seen["bias"] == {True, False}
    assert seen["layout"] == set(LAYOUTS)
    # Every valid (stride, dilation, output_padding) appears in both dimensions.
    combos = {(s, d, op) for s in (1, 2, 3) for d in (1, 2, 3) for op in range(max(s, d))}
    for dim in range(2):
        assert {(c["s"][dim], c["d"][dim], c["op"][dim]) for c in CONVT_OP_CASES} == combos
    assert any(c["op"][0] >= c["s"][0] for c in CONVT_OP_CASES)


# ------------------------------------------------------------------ parity sweeps


def _make_conv_tensors(case, transposed, gen, dtype=torch.float64):
    g, cin, cout = case["groups"], case["cin"], case["cout"]
    kh, kw = case["k"]
    shape = (cin,) + case["hw"] if case["batch"] is None else (case["batch"], cin) + case["hw"]
    x = make_tensor(shape, gen, case["layout"], dtype=dtype)
    wshape = (cin, cout // g, kh, kw) if transposed else (cout, cin // g, kh, kw)
    wlayout = {"channels_last": "channels_last", "transposed": "transposed"}.get(case["layout"], "contiguous")
    w = make_tensor(wshape, gen, wlayout, dtype=dtype)
    b = randn((cout,), gen, dtype) if case["bias"] else None
    return x, w, b


def _check_against(ours_fn, ref_fn, tensors, gen, tol=F64):
    """Outputs equal, and gradients of <out, g> with respect to every tensor equal."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    before = [t.detach().clone() if t is not None else None for t in leaves]
    ours = ours_fn(*leaves)
    ref = ref_fn(*leaves)
    assert ours.shape == ref.shape
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, **tol)
    g = randn(ref.shape, gen, ref.dtype)
    diff = [t for t in leaves if t is not None]
    got = torch.autograd.grad(ours, diff, g)
    want = torch.autograd.grad(ref, diff, g)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)
    for t, t0 in zip(leaves, before):
        if t is not None:
            assert_unchanged(t0, t.detach())
    return ours


def _check_conv2d_case(case):
    gen = torch.Generator().manual_seed(_seed(_id(case)))
    x, w, b = _make_conv_tensors(case, False, gen)
    kwargs = dict(stride=case["s"], padding=case["p"], dilation=case["d"], groups=case["groups"])
    _check_against(
        lambda x, w, b: convt_ext.conv2d(x, w, b, **kwargs),
        lambda x, w, b: F.conv2d(x, w, b, **kwargs),
        (x, w, b),
        gen,
    )


def _check_conv_transpose2d_case(case):
    gen = torch.Generator().manual_seed(_seed(_id(case)))
    x, w, b = _make_conv_tensors(case, True, gen)
    kwargs = dict(stride=case["s"], padding=case["p"], output_padding=case["op"], groups=case["groups"], dilation=case["d"])
    _check_against(
        lambda x, w, b: convt_ext.conv_transpose2d(x, w, b, **kwargs),
        lambda x, w, b: F.conv_transpose2d(x, w, b, **kwargs),
        (x, w, b),
        gen,
    )


@pytest.mark.parametrize("case", CONV2D_CASES, ids=_id)
def test_conv2d_matches_torch_float64(case):
    _check_conv2d_case(case)


@pytest.mark.parametrize("case", CONVT_CASES + CONVT_OP_CASES, ids=_id)
def test_conv_transpose2d_matches_torch_float64(case):
    _check_conv_transpose2d_case(case)


@pytest.mark.parametrize("limit", [1, 3000])
def test_sweep_subset_with_small_workspace(limit, restore_workspace_limit):
    """Every 5th computing sweep case again with a tiny workspace limit (one
    sample, or one block of window positions, at a time): the same results."""
    convt_ext.set_workspace_limit(limit)
    for case in computing(CONV2D_CASES)[::5]:
        _check_conv2d_case(case)
    for case in computing(CONVT_CASES + CONVT_OP_CASES)[::5]:
        _check_conv_transpose2d_case(case)


@pytest.mark.parametrize("limit", [1, 700])
def test_heavy_padding_single_sample_small_workspace(limit, rng, restore_workspace_limit):
    """Window rows that lie entirely in the padding, one sample (no wide GEMM),
    processed a few window rows at a time."""
    convt_ext.set_workspace_limit(limit)
    for k, p, s, d in [((1, 1), (3, 2), (1, 1), (1, 1)), ((2, 1), (5, 4), (2, 1), (1, 3)), ((3, 3), (4, 0), (1, 2), (2, 1))]:
        x = randn((1, 2, 5, 6), rng)
        w = randn((3, 2) + k, rng)
        b = randn((3,), rng)
        _check_against(
            lambda x, w, b: convt_ext.conv2d(x, w, b, s, p, d),
            lambda x, w, b: F.conv2d(x, w, b, s, p, d),
            (x, w, b),
            rng,
        )


def test_conv_transpose2d_positional_order_groups_before_dilation(rng):
    """Positional arguments follow F.conv_transpose2d: ..., output_padding, groups, dilation."""
    x = randn((2, 4, 5, 6), rng)
    w = randn((4, 3, 3, 2), rng)
    b = randn((6,), rng)
    ours = convt_ext.conv_transpose2d(x, w, b, 2, 1, 2, 2, 3)
    ref = F.conv_transpose2d(x, w, b, 2, 1, 2, 2, 3)
    torch.testing.assert_close(ours, ref, **F64)


def test_conv2d_positional_order(rng):
    x = randn((2, 4, 9, 8), rng)
    w = randn((6, 2, 3, 2), rng)
    b = randn((6,), rng)
    torch.testing.assert_close(convt_ext.conv2d(x, w, b, 2, 1, 2, 2), F.conv2d(x, w, b, 2, 1, 2, 2), **F64)


@pytest.mark.parametrize("k", [(2, 2), (4, 3), (2, 4), (3, 3), (1, 2)])
@pytest.mark.parametrize("d", [(1, 1), (2, 3)])
def test_conv2d_same_padding_even_kernels(k, d, rng):
    """'same' pads d*(k-1) in total, the odd pixel on the high side, like torch."""
    for shape in [(2, 3, 7, 6), (3, 5, 8)]:
        x = randn(shape, rng)
        w = randn((4, 3, *k), rng)
        b = randn((4,), rng)
        _check_against(
            lambda x, w, b: convt_ext.conv2d(x, w, b, padding="same", dilation=d),
            lambda x, w, b: F.conv2d(x, w, b, padding="same", dilation=d),
            (x, w, b),
            rng,
        )
        out = convt_ext.conv2d(x, w, b, padding="same", dilation=d)
        assert out.shape[-2:] == x.shape[-2:]


def _conv2d_weight_cases(n, seed):
    r = random.Random(seed)
    cases = []
    while len(cases) < n:
        g = r.randint(1, 3)
        cin, cout = g * r.randint(1, 2), g * r.randint(1, 3)
        k = (r.randint(1, 4), r.randint(1, 4))
        s = (r.randint(1, 3), r.randint(1, 3))
        p = (r.randint(0, 3), r.randint(0, 3))
        d = (r.randint(1, 3), r.randint(1, 3))
        hw = (r.randint(1, 12), r.randint(1, 12))
        out = [window_count(hw[i], k[i], s[i], p[i], d[i]) for i in range(2)]
        if min(out) < 1:
            continue
        cases.append((r.choice([0, 1, 2, 3, 7]), cin, cout, g, hw, k, s, p, d, tuple(out)))
    return cases


CONV2D_WEIGHT_CASES = _conv2d_weight_cases(60, seed=4)


@pytest.mark.parametrize("case", CONV2D_WEIGHT_CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_conv2d_weight_matches_torch(case):
    n, cin, cout, g, hw, k, s, p, d, out = case
    gen = torch.Generator().manual_seed(_seed(str(case)))
    x = randn((n, cin) + hw, gen)
    dy = randn((n, cout) + out, gen)
    wsize = (cout, cin // g) + k
    x0, dy0 = x.clone(), dy.clone()
    ours = convt_ext.conv2d_weight(x, wsize, dy, s, p, d, g)
    ref = torch_conv2d_weight(x, wsize, dy, s, p, d, g)
    assert ours.shape == wsize
    torch.testing.assert_close(ours, ref, **F64)
    assert_unchanged(x0, x)
    assert_unchanged(dy0, dy)
    # The op form with lists.
    torch.testing.assert_close(ops.conv2d_weight(x, dy, list(wsize), list(s), list(p), list(d), g), ref, **F64)


def test_conv2d_weight_unbatched(rng):
    x = randn((4, 7, 6), rng)
    dy = randn((6, 3, 5), rng)
    ref = torch_conv2d_weight(x[None], (6, 2, 3, 2), dy[None], (2, 1), 0, 1, 2)
    torch.testing.assert_close(convt_ext.conv2d_weight(x, (6, 2, 3, 2), dy, (2, 1), 0, 1, 2), ref, **F64)


# ------------------------------------------------------------------ gradcheck

CONV2D_GRADCHECK = [
    # x shape, w shape, bias, stride, padding, dilation, groups
    ((2, 2, 4, 3), (2, 2, 2, 3), True, 1, 0, 1, 1),
    ((1, 4, 5, 4), (2, 2, 3, 2), True, (2, 1), (1, 2), (1, 2), 2),
    ((1, 3, 5, 5), (3, 1, 2, 2), False, 2, 1, 2, 3),
    ((2, 4, 3), (2, 2, 2, 2), True, 1, "same", (2, 1), 1),  # unbatched, even kernel 'same'
    ((1, 2, 3, 3), (2, 2, 1, 1), True, 1, 0, 1, 1),  # 1x1 direct path
    ((3, 2, 3, 3), (1, 2, 2, 2), True, 1, 1, 1, 1),  # wide path, batch 3
]


@pytest.mark.parametrize("xs,ws,bias,s,p,d,g", CONV2D_GRADCHECK)
def test_conv2d_gradcheck(xs, ws, bias, s, p, d, g, rng):
    x = randn(xs, rng).requires_grad_()
    w = randn(ws, rng).requires_grad_()
    b = randn((ws[0],), rng).requires_grad_() if bias else None
    args = (x, w, b) if bias else (x, w)
    fn = lambda x, w, b=None: convt_ext.conv2d(x, w, b, s, p, d, g)  # noqa: E731
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


CONVT_GRADCHECK = [
    # x shape, w shape, bias, stride, padding, output_padding, groups, dilation
    ((2, 2, 2, 3), (2, 2, 2, 3), True, 1, 0, 0, 1, 1),
    ((1, 4, 3, 3), (4, 1, 3, 2), True, 2, 1, 1, 2, 1),
    ((2, 3, 3, 2), (3, 1, 2, 2), False, (2, 1), (1, 0), (1, 2), 3, (1, 3)),
    ((1, 2, 3, 3), (2, 2, 2, 2), True, 1, 0, 2, 1, 3),  # output_padding >= stride (allowed by dilation)
    ((2, 2, 2, 3), (2, 2, 3, 2), True, (1, 2), (1, 0), (2, 1), 2, (3, 2)),  # likewise, groups 2
    ((2, 3, 3), (2, 2, 2, 2), True, 2, 0, 1, 1, 1),  # unbatched
    ((3, 2, 2, 2), (2, 2, 1, 1), True, 1, 0, 0, 1, 1),  # 1x1 pointwise path
]


@pytest.mark.parametrize("xs,ws,bias,s,p,op,g,d", CONVT_GRADCHECK)
def test_conv_transpose2d_gradcheck(xs, ws, bias, s, p, op, g, d, rng):
    x = randn(xs, rng).requires_grad_()
    w = randn(ws, rng).requires_grad_()
    b = randn((ws[1] * g,), rng).requires_grad_() if bias else None
    args = (x, w, b) if bias else (x, w)
    fn = lambda x, w, b=None: convt_ext.conv_transpose2d(x, w, b, s, p, op, g, d)  # noqa: E731
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


CONV2D_WEIGHT_GRADCHECK = [
    # x shape, weight size, stride, padding, dilation, groups
    ((1, 2, 3, 4), (2, 2, 2, 2), 1, 0, 1, 1),
    ((1, 4, 6, 5), (2, 2, 3, 2), (2, 1), (1, 0), (1, 2), 2),
    ((2, 3, 5, 5), (3, 1, 2, 2), 2, 1, 2, 3),
    ((2, 2, 2, 3), (2, 2, 1, 1), 1, 0, 1, 1),  # 1x1: per sample on the CPU (the wide path on a GPU)
]


@pytest.mark.parametrize("xs,wsize,s,p,d,g", CONV2D_WEIGHT_GRADCHECK)
def test_conv2d_weight_gradcheck(xs, wsize, s, p, d, g, rng):
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    s2, p2, d2 = pair(s), pair(p), pair(d)
    out = tuple(window_count(xs[2 + i], wsize[2 + i], s2[i], p2[i], d2[i]) for i in range(2))
    x = randn(xs, rng).requires_grad_()
    dy = randn((xs[0], wsize[0]) + out, rng).requires_grad_()
    fn = lambda x, dy: convt_ext.conv2d_weight(x, wsize, dy, s, p, d, g)  # noqa: E731
    assert gradcheck(fn, (x, dy))
    assert gradgradcheck(fn, (x, dy))


def test_conv2d_weight_grad_matches_torch(rng):
    """conv2d_weight's own gradients equal those of torch.nn.grad.conv2d_weight."""
    x = randn((2, 4, 7, 6), rng)
    dy = randn((2, 6, 4, 5), rng)
    args = ((6, 2, 3, 2), (2, 1), (1, 0), (1, 1), 2)
    _check_against(
        lambda x, dy: convt_ext.conv2d_weight(x, args[0], dy, *args[1:]),
        lambda x, dy: torch_conv2d_weight(x, args[0], dy, *args[1:]),
        (x, dy),
        rng,
    )


@pytest.mark.parametrize("transposed", [False, True])
def test_double_backward_matches_torch(transposed, rng):
    """A gradient penalty (grad of a function of the input gradient) equals torch's."""
    if transposed:
        x, w, b = randn((2, 4, 4, 3), rng), randn((4, 3, 3, 2), rng), randn((6,), rng)
        ours_fn = lambda x, w, b: convt_ext.conv_transpose2d(x, w, b, 2, 1, (1, 2), 2, (1, 3))  # noqa: E731
        ref_fn = lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1, (1, 2), 2, (1, 3))  # noqa: E731
    else:
        x, w, b = randn((2, 4, 7, 6), rng), randn((6, 2, 3, 2), rng), randn((6,), rng)
        ours_fn = lambda x, w, b: convt_ext.conv2d(x, w, b, (2, 1), 1, (1, 2), 2)  # noqa: E731
        ref_fn = lambda x, w, b: F.conv2d(x, w, b, (2, 1), 1, (1, 2), 2)  # noqa: E731

    def penalty_grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fn(*leaves)
        gx, gw = torch.autograd.grad((y.tanh()).sum(), leaves[:2], create_graph=True)
        pen = (gx**2).sum() + (gw**3).sum()
        return torch.autograd.grad(pen, leaves)

    for a, r in zip(penalty_grads(ours_fn), penalty_grads(ref_fn)):
        torch.testing.assert_close(a, r, **F64)


SHORT_GRAD_OUTPUT = [
    # x shape, weight size, grad_output spatial, stride, padding, dilation, groups
    # Fewer windows than the input has, as a conv_transpose2d with
    # output_padding >= stride produces (dilation 3 > output_padding 2):
    ((2, 2, 9, 8), (2, 2, 2, 2), (4, 5), (1, 1), (0, 0), (3, 2), 1),
    ((1, 4, 9, 9), (4, 2, 2, 3), (6, 3), (1, 2), (1, 0), (3, 2), 2),
    # Fewer windows than any valid output_padding explains: the op accepts
    # this grad_output (forward), so its gradients must be computable too.
    ((1, 2, 10, 9), (3, 2, 2, 2), (3, 4), (2, 2), (0, 0), (1, 1), 1),
    ((2, 2, 9, 8), (2, 2, 2, 2), (3, 3), (1, 1), (0, 0), (3, 2), 1),
]


@pytest.mark.parametrize("xs,wsize,out,s,p,d,g", SHORT_GRAD_OUTPUT)
def test_conv2d_weight_short_grad_output(xs, wsize, out, s, p, d, g, rng):
    """conv2d_weight with a grad_output covering only the first windows equals
    torch's weight gradient with grad_output zero-padded to every window, in
    value and in its gradients with respect to input and grad_output."""
    natural = [window_count(xs[2 + i], wsize[2 + i], s[i], p[i], d[i]) for i in range(2)]
    assert all(out[i] <= natural[i] for i in range(2)) and out != tuple(natural)
    x = randn(xs, rng)
    dy = randn((xs[0], wsize[0]) + out, rng)
    pad = (0, natural[1] - out[1], 0, natural[0] - out[0])
    _check_against(
        lambda x, dy: convt_ext.conv2d_weight(x, wsize, dy, s, p, d, g),
        lambda x, dy: torch_conv2d_weight(x, wsize, F.pad(dy, pad), s, p, d, g),
        (x, dy),
        rng,
    )


# ------------------------------------------------------------------ opcheck


def _opcheck_sets(rng):
    r = lambda *s: randn(s, rng)  # noqa: E731
    return [
        (ops.im2col.default, (r(2, 3, 6, 5), [2, 2], [1, 1], [0, 0], [1, 1])),
        (ops.im2col.default, (r(3, 7, 6), [3, 2], [2, 1], [1, 2], [2, 3])),
        (ops.col2im.default, (r(2, 12, 20), [6, 5], [2, 2], [1, 1], [0, 0], [1, 1])),
        (ops.col2im.default, (r(12, 8), [6, 5], [2, 3], [1, 1], [1, 0], [2, 2])),
        (ops.conv2d.default, (r(2, 4, 7, 6), r(6, 2, 3, 2), r(6), [2, 1], [1, 0], [1, 2], 2)),
        (ops.conv2d.default, (r(3, 2, 5, 5), r(3, 2, 2, 2), None, [1, 1], [0, 0], [1, 1], 1)),
        (ops.conv2d.default, (r(0, 3, 5, 5), r(3, 1, 2, 2), r(3), [1, 2], [1, 1], [2, 1], 3)),
        (ops.conv2d.default, (r(2, 2, 4, 4), r(3, 2, 1, 1), r(3), [1, 1], [0, 0], [1, 1], 1)),
        (ops.conv_transpose2d.default, (r(2, 4, 3, 4), r(4, 3, 3, 2), r(6), [2, 1], [1, 0], [1, 0], 2, [1, 1])),
        (ops.conv_transpose2d.default, (r(1, 2, 3, 3), r(2, 2, 2, 2), None, [1, 1], [0, 0], [2, 1], 1, [3, 2])),
        (ops.conv_transpose2d.default, (r(3, 3, 2, 2), r(3, 1, 2, 2), r(3), [2, 2], [0, 1], [1, 1], 3, [1, 1])),
        (ops.conv_transpose2d.default, (r(2, 2, 3, 3), r(2, 2, 1, 1), r(2), [1, 1], [0, 0], [0, 0], 1, [1, 1])),
        (ops.conv2d_weight.default, (r(2, 4, 7, 6), r(2, 6, 4, 5), [6, 2, 3, 2], [2, 1], [1, 0], [1, 1], 2)),
        (ops.conv2d_weight.default, (r(3, 2, 5, 5), r(3, 3, 4, 4), [3, 2, 2, 2], [1, 1], [0, 0], [1, 1], 1)),
        # grad_output covering fewer windows than the input has (the transposed-conv
        # case: 6x6 natural windows, 2 and 1 fewer, as with output_padding (2, 1)).
        (ops.conv2d_weight.default, (r(1, 2, 9, 8), r(1, 2, 4, 5), [2, 2, 2, 2], [1, 1], [0, 0], [3, 2], 1)),
        # channels_last operands: the fake kernels must give the real strides.
        (ops.conv2d.default, (cl(r(2, 4, 7, 6)), r(6, 2, 3, 2), r(6), [2, 1], [1, 0], [1, 2], 2)),
        (ops.conv_transpose2d.default, (r(2, 4, 3, 4), cl(r(4, 3, 3, 2)), r(6), [2, 1], [1, 0], [1, 0], 2, [1, 1])),
        (ops.conv2d_weight.default, (cl(r(2, 4, 7, 6)), r(2, 6, 4, 5), [6, 2, 3, 2], [2, 1], [1, 0], [1, 1], 2)),
    ]


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("index", range(18))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(index, requires_grad, rng):
    sets = _opcheck_sets(rng)
    assert len(sets) == 18
    op, args = sets[index]
    args = tuple(a.requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


def test_fake_kernels_give_real_shapes(rng):
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [
        (F.conv2d, convt_ext.conv2d, (2, 4, 9, 8), (6, 2, 3, 2), dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)),
        (F.conv2d, convt_ext.conv2d, (2, 4, 9, 8), (6, 4, 4, 2), dict(padding="same", dilation=(1, 2))),
        (F.conv_transpose2d, convt_ext.conv_transpose2d, (2, 4, 3, 4), (4, 3, 3, 2), dict(stride=2, padding=1, output_padding=1, groups=2)),
        (F.conv_transpose2d, convt_ext.conv_transpose2d, (1, 2, 3, 3), (2, 2, 2, 2), dict(output_padding=2, dilation=3)),
    ]
    for ref_fn, fn, xs, ws, kwargs in cases:
        ref = ref_fn(torch.zeros(xs), torch.zeros(ws), **kwargs)
        with FakeTensorMode():
            out = fn(torch.empty(xs), torch.empty(ws), **kwargs)
        assert tuple(out.shape) == tuple(ref.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["input", "weight", "neither"])
def test_fake_kernels_give_real_strides(layout, dtype):
    """Fake and real outputs agree on strides (torch.compile relies on it),
    channels_last ones included, and both agree with torch's layout."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [
        (F.conv2d, convt_ext.conv2d, (2, 4, 9, 8), (6, 2, 3, 2), dict(stride=2, padding=1, groups=2), torch.channels_last),
        (F.conv_transpose2d, convt_ext.conv_transpose2d, (2, 4, 3, 4), (4, 3, 3, 2), dict(stride=2, groups=2), torch.channels_last),
        (F.conv3d, convt_ext.conv3d, (2, 4, 5, 4, 3), (6, 4, 3, 2, 2), dict(padding=1), torch.channels_last_3d),
        (F.conv_transpose3d, convt_ext.conv_transpose3d, (2, 4, 3, 4, 3), (4, 3, 2, 2, 2), dict(stride=2), torch.channels_last_3d),
    ]
    for ref_fn, fn, xs, ws, kwargs, fmt in cases:
        def make(shape, which, empty=False):
            t = torch.empty(shape, dtype=dtype) if empty else torch.randn(shape).to(dtype)
            return t.contiguous(memory_format=fmt) if layout == which else t

        x, w = make(xs, "input"), make(ws, "weight")
        real, ref = fn(x, w, **kwargs), ref_fn(x, w, **kwargs)
        with FakeTensorMode():
            fake = fn(make(xs, "input", True), make(ws, "weight", True), **kwargs)
        assert fake.stride() == real.stride(), (fn.__name__, layout)
        assert real.stride() == ref.stride(), (fn.__name__, layout)


# ------------------------------------------------------------------ torch.compile


def _net(conv2d, conv_transpose2d):
    def f(x, w1, b1, w2, b2):
        h = conv2d(x, w1, b1, stride=2, padding=1, dilation=1, groups=2)
        h = torch.tanh(h)
        return conv_transpose2d(h, w2, b2, stride=2, padding=1, output_padding=1, groups=1, dilation=1)

    return f


def _compile_check(compiled, shapes, rng):
    eager_ref = _net(F.conv2d, F.conv_transpose2d)
    eager_ours = _net(convt_ext.conv2d, convt_ext.conv_transpose2d)
    w1, b1 = randn((6, 2, 3, 3), rng), randn((6,), rng)
    w2, b2 = randn((6, 3, 3, 3), rng), randn((3,), rng)
    for shape in shapes:
        x = randn(shape, rng)
        leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
        y = compiled(*leaves)
        g = randn(y.shape, rng)
        grads = torch.autograd.grad(y, leaves, g)
        for fn in (eager_ref, eager_ours):
            y_ref = fn(*leaves)
            grads_ref = torch.autograd.grad(y_ref, leaves, g)
            torch.testing.assert_close(y, y_ref, **F64)
            for a, b in zip(grads, grads_ref):
                torch.testing.assert_close(a, b, **F64)


def test_compile_fullgraph(rng):
    torch._dynamo.reset()
    compiled = torch.compile(_net(convt_ext.conv2d, convt_ext.conv_transpose2d), fullgraph=True, backend="aot_eager")
    _compile_check(compiled, [(2, 4, 8, 10)], rng)


def test_compile_dynamic(rng):
    torch._dynamo.reset()
    compiled = torch.compile(
        _net(convt_ext.conv2d, convt_ext.conv_transpose2d), fullgraph=True, backend="aot_eager", dynamic=True
    )
    _compile_check(compiled, [(2, 4, 8, 10), (3, 4, 12, 6), (1, 4, 5, 7)], rng)


# ------------------------------------------------------------------ workspace limit


def _limit_values(first_bytes, second_bytes=None):
    """Workspace limits to try, given two ops' column bytes per sample: 1 byte
    (one sample, or one window row, at a time), two samples per chunk of the
    first op and three of the second (with batch 5: a short last chunk), and
    the default (one chunk)."""
    second_bytes = first_bytes if second_bytes is None else second_bytes
    return [1, 2 * first_bytes, 3 * second_bytes + 1, DEFAULT_WORKSPACE_LIMIT]


def _conv_grads(fn, tensors, g):
    leaves = [t.clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, g))


@pytest.mark.parametrize("spatial", [(6, 5), (64, 40)], ids=["wide", "per_sample"])
def test_workspace_limit_does_not_change_results(spatial, rng, restore_workspace_limit):
    N, g = 5, 2
    x = randn((N, 4) + spatial, rng)
    w = randn((6, 2, 3, 2), rng)
    b = randn((6,), rng)
    xt = randn((N, 6) + spatial, rng)
    wt = randn((6, 2, 3, 2), rng)
    bt = randn((4,), rng)
    conv = lambda x, w, b: convt_ext.conv2d(x, w, b, (2, 1), 1, (1, 2), g)  # noqa: E731
    convt = lambda x, w, b: convt_ext.conv_transpose2d(x, w, b, 2, 1, 1, g, 1)  # noqa: E731
    # output_padding >= stride (dilation 3): the output has more windows than the columns.
    convt_big_op = lambda x, w, b: convt_ext.conv_transpose2d(x, w, b, 1, 1, 2, g, 3)  # noqa: E731
    y_shape = F.conv2d(x, w, b, (2, 1), 1, (1, 2), g).shape
    yt_shape = F.conv_transpose2d(xt, wt, bt, 2, 1, 1, g, 1).shape
    gy, gyt = randn(y_shape, rng), randn(yt_shape, rng)

    # References from torch.
    want = _conv_grads(lambda x, w, b: F.conv2d(x, w, b, (2, 1), 1, (1, 2), g), (x, w, b), gy)
    want_t = _conv_grads(lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1, 1, g, 1), (xt, wt, bt), gyt)
    gyo = randn(F.conv_transpose2d(xt, wt, bt, 1, 1, 2, g, 3).shape, rng)
    want_o = _conv_grads(lambda x, w, b: F.conv_transpose2d(x, w, b, 1, 1, 2, g, 3), (xt, wt, bt), gyo)

    # Column bytes per sample: (C_in*kh*kw) x (output positions) for conv2d,
    # (C_out*kh*kw) x (input positions) for conv_transpose2d, 8-byte values.
    conv_bytes = 4 * 3 * 2 * y_shape[-1] * y_shape[-2] * 8
    convt_bytes = 4 * 3 * 2 * spatial[0] * spatial[1] * 8
    # Limits below one sample, too: a few window rows of one sample at a time.
    row_bytes = 4 * 3 * 2 * y_shape[-1] * 8
    limits = _limit_values(conv_bytes, convt_bytes) + [5 * row_bytes + 1]
    results = {}
    for limit in limits:
        convt_ext.set_workspace_limit(limit)
        assert convt_ext.workspace_limit() == limit
        got = _conv_grads(conv, (x, w, b), gy)
        got_t = _conv_grads(convt, (xt, wt, bt), gyt)
        got_o = _conv_grads(convt_big_op, (xt, wt, bt), gyo)
        for a, r in zip(got + got_t + got_o, want + want_t + want_o):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
        results[limit] = got + got_t + got_o
    # And the results at every limit agree with each other to 1e-12.
    first = results[1]
    for limit, res in results.items():
        for a, r in zip(res, first):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_transpose_backward_over_many_wide_chunks(dtype, rng):
    """conv_transpose's fused backward (one im2col of grad_output for both gradients) on
    the wide path, over many chunks of samples at the default workspace limit: a batch
    of 64 with 30x30 = 900 window positions (under the CPU's 1024). A chunk holds the
    columns (C_out*3*3 rows) and two input-sized operands (2*C_in rows) of each sample:
    (144 + 32) * 900 * 8 bytes = 1.27 MB in float64, so the 8 MiB chunk budget takes 6
    samples (11 chunks), and 13 in float32 (5 chunks). On the column path (pinned: in
    float32 an AVX-512 CPU's rule takes the view), against float64 torch."""
    assert convt_ext.workspace_limit() == DEFAULT_WORKSPACE_LIMIT
    old = convt_ext.conv_path()
    convt_ext.set_conv_path("columns")
    try:
        x, w, b = randn((64, 16, 30, 30), rng, dtype), randn((16, 16, 3, 3), rng, dtype), randn((16,), rng, dtype)
        gy = randn((64, 16, 30, 30), rng, dtype)
        got = _conv_grads(lambda x, w, b: convt_ext.conv_transpose2d(x, w, b, 1, 1), (x, w, b), gy)
    finally:
        convt_ext.set_conv_path(old)
    l64 = [t.double() for t in (x, w, b)]
    want = _conv_grads(lambda x, w, b: F.conv_transpose2d(x, w, b, 1, 1), l64, gy.double())
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-3)
    for name, a, e in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, want):
        torch.testing.assert_close(a.double(), e, **tol, msg=lambda m: f"{name}: {m}")


def test_workspace_limit_conv2d_weight(rng, restore_workspace_limit):
    x = randn((5, 4, 9, 8), rng)
    dy = randn((5, 6, 5, 5), rng)
    ref = torch_conv2d_weight(x, (6, 2, 3, 2), dy, 2, 1, 1, 2)
    for limit in _limit_values(4 * 3 * 2 * 5 * 5 * 8):
        convt_ext.set_workspace_limit(limit)
        torch.testing.assert_close(convt_ext.conv2d_weight(x, (6, 2, 3, 2), dy, 2, 1, 1, 2), ref, rtol=1e-12, atol=1e-12)


def test_workspace_limit_fixture_restores():
    assert convt_ext.workspace_limit() == DEFAULT_WORKSPACE_LIMIT


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-5, ValueError), (True, TypeError), (1.5, TypeError), ("1", TypeError)])
def test_set_workspace_limit_rejects_bad_values(bad, exc, restore_workspace_limit):
    with pytest.raises(exc, match="bytes"):
        convt_ext.set_workspace_limit(bad)
    assert convt_ext.workspace_limit() == restore_workspace_limit


def _python(code, env_value, cwd):
    """Run `code` in a fresh interpreter that imports the same convt_ext as this
    process (in-place build or installed package), from a neutral directory."""
    env = dict(os.environ)
    if env_value is None:
        env.pop("CONVT_EXT_WORKSPACE_LIMIT", None)
    else:
        env["CONVT_EXT_WORKSPACE_LIMIT"] = env_value
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(convt_ext.__file__)))
    env["PYTHONPATH"] = package_parent + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=cwd, timeout=120)


def test_workspace_limit_environment_variable(tmp_path):
    code = (
        "import torch, torch.nn.functional as F, convt_ext\n"
        "print(convt_ext.workspace_limit(), convt_ext.build_info()['workspace_limit'])\n"
        "x = torch.randn(4, 2, 6, 6, dtype=torch.float64); w = torch.randn(3, 2, 3, 3, dtype=torch.float64)\n"
        "assert torch.allclose(convt_ext.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1), rtol=1e-12, atol=1e-12)\n"
    )
    res = _python(code + "print(convt_ext.__file__)\n", "12345", tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["12345", "12345", os.path.abspath(convt_ext.__file__)]
    res = _python("import convt_ext", "lots", tmp_path)
    assert res.returncode != 0
    assert "CONVT_EXT_WORKSPACE_LIMIT" in res.stderr and "ValueError" in res.stderr


@pytest.mark.parametrize("value", ["0", "-4096"])
def test_workspace_limit_environment_variable_rejects_non_positive(value, monkeypatch, restore_workspace_limit):
    # Re-reads the variable the way import does, without a new interpreter.
    monkeypatch.setenv("CONVT_EXT_WORKSPACE_LIMIT", value)
    with pytest.raises(ValueError, match="CONVT_EXT_WORKSPACE_LIMIT"):
        convt_ext._workspace_from_env()
    assert convt_ext.workspace_limit() == restore_workspace_limit


def test_build_info_and_version():
    info = convt_ext.build_info()
    assert info["version"] == convt_ext.__version__
    assert isinstance(convt_ext.__version__, str) and convt_ext.__version__.count(".") >= 1
    assert info["torch"] == torch.__version__
    assert info["workspace_limit"] == convt_ext.workspace_limit()
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)
    if torch.version.cuda is None:
        assert info["cuda"] is False
    for name in ("im2col", "col2im", "conv2d", "conv_transpose2d", "conv2d_weight", "set_workspace_limit", "workspace_limit", "build_info"):
        assert name in convt_ext.__all__ and callable(getattr(convt_ext, name))


# ------------------------------------------------------------------ GEMM paths


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("shape", [(6, 6, 5, 5), (2, 6, 40, 40)], ids=["wide_batch6_5x5", "per_sample_batch2_40x40"])
def test_gemm_paths_match_torch(shape, groups, bias, rng):
    x = make_tensor(shape, rng, "channels_last" if bias else "contiguous")
    w = randn((9, 6 // groups, 3, 3), rng)
    b = randn((18,), rng)[::2] if bias else None  # a strided bias
    _check_against(
        lambda x, w, b: convt_ext.conv2d(x, w, b, 1, 1, 1, groups),
        lambda x, w, b: F.conv2d(x, w, b, 1, 1, 1, groups),
        (x, w, b),
        rng,
    )
    wt = randn((6, 9 // groups, 3, 3), rng)
    bt = randn((27,), rng)[1::3] if bias else None
    _check_against(
        lambda x, w, b: convt_ext.conv_transpose2d(x, w, b, 2, 1, 1, groups),
        lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1, 1, groups),
        (x, wt, bt),
        rng,
    )
    # 1x1 kernels take the direct / pointwise shortcuts.
    w1 = randn((9, 6 // groups, 1, 1), rng)
    _check_against(
        lambda x, w, b: convt_ext.conv2d(x, w, b, groups=groups),
        lambda x, w, b: F.conv2d(x, w, b, groups=groups),
        (x, w1, b),
        rng,
    )
    wt1 = randn((6, 9 // groups, 1, 1), rng)
    _check_against(
        lambda x, w, b: convt_ext.conv_transpose2d(x, w, b, groups=groups),
        lambda x, w, b: F.conv_transpose2d(x, w, b, groups=groups),
        (x, wt1, bt),
        rng,
    )


# ------------------------------------------------------------------ autograd corners


@pytest.mark.parametrize("which", ["x", "w", "b", "xw", "wb", "xb"])
@pytest.mark.parametrize("transposed", [False, True])
def test_partial_requires_grad(which, transposed, rng):
    """Only some inputs require grad: those grads equal torch's, others stay None."""
    if transposed:
        x, w, b = randn((2, 4, 4, 3), rng), randn((4, 3, 3, 2), rng), randn((6,), rng)
        fns = [lambda x, w, b, f=f: f(x, w, b, 2, 1, 1, 2, 1) for f in (convt_ext.conv_transpose2d, F.conv_transpose2d)]
    else:
        x, w, b = randn((2, 4, 7, 6), rng), randn((6, 2, 3, 2), rng), randn((6,), rng)
        fns = [lambda x, w, b, f=f: f(x, w, b, (2, 1), 1, (1, 2), 2) for f in (convt_ext.conv2d, F.conv2d)]
    results = []
    for fn in fns:
        leaves = [t.clone().requires_grad_(name in which) for t, name in zip((x, w, b), "xwb")]
        y = fn(*leaves)
        g = torch.ones_like(y) if not results else results[0][0]
        y.backward(g)
        results.append((g, [t.grad for t in leaves]))
    for a, r, name in zip(results[0][1], results[1][1], "xwb"):
        if name in which:
            torch.testing.assert_close(a, r, **F64)
        else:
            assert a is None and r is None


def test_strided_and_expanded_upstream_gradients(rng):
    """Backward with zero-stride (from .sum()) and transposed upstream gradients."""
    x, w, b = randn((3, 4, 7, 6), rng), randn((6, 2, 3, 2), rng), randn((6,), rng)
    xt, wt, bt = randn((3, 4, 4, 5), rng), randn((4, 3, 3, 2), rng), randn((6,), rng)
    cases = [
        (lambda f: (lambda x, w, b: f(x, w, b, (2, 1), 1, (1, 2), 2)), (convt_ext.conv2d, F.conv2d), (x, w, b)),
        (lambda f: (lambda x, w, b: f(x, w, b, 2, 1, 1, 2, 1)), (convt_ext.conv_transpose2d, F.conv_transpose2d), (xt, wt, bt)),
        (lambda f: (lambda x, w, b: f(x, w, b, 1, 0, 2, 2, 3)), (convt_ext.conv_transpose2d, F.conv_transpose2d), (xt, wt, bt)),
        (lambda f: (lambda x: f(x, (3, 2), (1, 2), 1, (2, 1))), (convt_ext.im2col, F.unfold), (x,)),
    ]
    for make, (ours, ref), tensors in cases:
        for loss in (lambda y: y.sum(), lambda y: (y.transpose(-1, -2).contiguous() ** 2).sum() + y.mean()):
            got, want = [], []
            for f, out in ((ours, got), (ref, want)):
                leaves = [t.clone().requires_grad_() for t in tensors]
                loss(make(f)(*leaves)).backward()
                out.extend(t.grad for t in leaves)
            for a, r in zip(got, want):
                torch.testing.assert_close(a, r, **F64)


def test_expanded_inputs(rng):
    """Inputs with zero strides (expanded) are read correctly."""
    x = randn((1, 1, 1, 9), rng).expand(2, 4, 8, 9)
    w = randn((6, 1, 1, 1), rng).expand(6, 2, 3, 2)
    b = randn((1,), rng).expand(6)
    torch.testing.assert_close(convt_ext.conv2d(x, w, b, 1, 1, 1, 2), F.conv2d(x, w, b, 1, 1, 1, 2), **F64)
    wt = randn((4, 1, 1, 1), rng).expand(4, 3, 3, 2)
    torch.testing.assert_close(
        convt_ext.conv_transpose2d(x, wt, b, 2, 1, 1, 2), F.conv_transpose2d(x, wt, b, 2, 1, 1, 2), **F64
    )
    assert torch.equal(convt_ext.im2col(x, (3, 2), 1, 1, 1), F.unfold(x, (3, 2), 1, 1, 1))
    c = randn((1, 1, 48), rng).expand(2, 24, 48)
    torch.testing.assert_close(convt_ext.col2im(c, (8, 9), (3, 2)), F.fold(c, (8, 9), (3, 2)), **F64)


# ------------------------------------------------------------------ modes and threads


def _three_convs(rng):
    x, w, b = randn((3, 4, 9, 8), rng), randn((6, 2, 3, 2), rng), randn((6,), rng)
    xt, wt = randn((3, 4, 5, 4), rng), randn((4, 3, 3, 2), rng)
    dy = randn((3, 6, 5, 5), rng)
    ours = [
        lambda: convt_ext.conv2d(x, w, b, (2, 1), 1, 1, 2),
        lambda: convt_ext.conv_transpose2d(xt, wt, b, 2, 1, 1, 2),
        lambda: convt_ext.conv2d_weight(x, (6, 2, 3, 2), dy, 2, 1, 1, 2),
    ]
    refs = [
        F.conv2d(x, w, b, (2, 1), 1, 1, 2),
        F.conv_transpose2d(xt, wt, b, 2, 1, 1, 2),
        torch_conv2d_weight(x, (6, 2, 3, 2), dy, 2, 1, 1, 2),
    ]
    return ours, refs


def _in_fresh_thread(fn):
    """Run fn in a new thread and re-raise what it raised. Keeps per-thread
    state the library may hold (e.g. cached buffers) out of other tests."""
    import threading

    errors = []

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_grad_modes_before_and_after(mode, rng):
    """Calls under torch.inference_mode() / torch.no_grad() are correct, and so
    are the calls that follow them, on the same thread, outside that mode
    (forward and backward)."""
    ours, refs = _three_convs(rng)
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    x = randn((3, 4, 9, 8), rng)
    w = randn((6, 2, 3, 2), rng)
    xr = x.clone().requires_grad_()
    (gr,) = torch.autograd.grad(F.conv2d(xr, w, None, (2, 1), 1, 1, 2).square().sum(), xr)

    def scenario():
        with ctx():
            for fn, ref in zip(ours, refs):
                torch.testing.assert_close(fn(), ref, **F64)
        for fn, ref in zip(ours, refs):
            torch.testing.assert_close(fn(), ref, **F64)
        xg = x.clone().requires_grad_()
        y = convt_ext.conv2d(xg, w, None, (2, 1), 1, 1, 2)
        (gx,) = torch.autograd.grad(y.square().sum(), xg)
        torch.testing.assert_close(gx, gr, **F64)

    _in_fresh_thread(scenario)


def test_concurrent_threads(rng):
    """Several Python threads calling the convolutions at once get correct results."""
    import threading

    ours, refs = _three_convs(rng)
    errors = []

    def work():
        try:
            for _ in range(15):
                for fn, ref in zip(ours, refs):
                    torch.testing.assert_close(fn(), ref, **F64)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precision_parity(dtype, rng):
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    x = randn((3, 4, 9, 8), rng, dtype)
    w = randn((6, 2, 3, 2), rng, dtype)
    b = randn((6,), rng, dtype)
    y = convt_ext.conv2d(x, w, b, 1, 1, (1, 2), 2)
    assert y.dtype == dtype
    ref = F.conv2d(x.float(), w.float(), b.float(), 1, 1, (1, 2), 2)
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    wt = randn((4, 3, 3, 2), rng, dtype)
    bt = randn((6,), rng, dtype)
    y = convt_ext.conv_transpose2d(x, wt, bt, 2, 1, 1, 2)
    assert y.dtype == dtype
    ref = F.conv_transpose2d(x.float(), wt.float(), bt.float(), 2, 1, 1, 2)
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    # Gradients in the same dtype.
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = convt_ext.conv2d(xl, wl, None, 1, 1, (1, 2), 2)
    gy = randn(y.shape, rng, dtype)
    gx, gw = torch.autograd.grad(y, (xl, wl), gy)
    assert gx.dtype == gw.dtype == dtype
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    yr = F.conv2d(xr, wr, None, 1, 1, (1, 2), 2)
    rx, rw = torch.autograd.grad(yr, (xr, wr), gy.float())
    torch.testing.assert_close(gx.float(), rx, rtol=tol, atol=tol * rx.abs().max().item())
    torch.testing.assert_close(gw.float(), rw, rtol=tol, atol=tol * rw.abs().max().item())


# ------------------------------------------------------------------ inputs untouched


def test_inputs_not_modified_by_forward_and_backward(rng):
    x = make_tensor((3, 4, 7, 6), rng, "channels_last")
    w = make_tensor((6, 2, 3, 2), rng, "transposed")
    b = make_tensor((6,), rng, "offset")
    saved = [t.clone() for t in (x, w, b)]
    strides = [t.stride() for t in (x, w, b)]
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    y = convt_ext.conv2d(*leaves, 1, 1, 1, 2)
    y2 = convt_ext.conv_transpose2d(y, w.detach().clone().requires_grad_(), None, 1, 1, 0, 2)
    (y.sum() + y2.pow(2).sum()).backward()
    for t, t0, st in zip((x, w, b), saved, strides):
        assert_unchanged(t0, t)
        assert t.stride() == st
    # The transposed conv's inputs too.
    xt = randn((2, 6, 4, 5), rng)
    wt = randn((6, 1, 3, 3), rng)
    bt = randn((3,), rng)
    saved = [t.clone() for t in (xt, wt, bt)]
    convt_ext.conv_transpose2d(xt, wt, bt, 2, 1, 1, 3)
    for t, t0 in zip((xt, wt, bt), saved):
        assert_unchanged(t0, t)


# ------------------------------------------------------------------ errors


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


X = _t(1, 4, 6, 6)
W = _t(6, 2, 3, 3)  # groups=2 fits X

CONV2D_ERRORS = [
    # (args, kwargs, exception, regex)
    ((_t(1, 3, 6, 6), _t(6, 2, 3, 3)), {}, ValueError, r"weight"),  # channel mismatch
    ((X, _t(6, 3, 3, 3)), dict(groups=1), ValueError, r"weight"),
    ((X, _t(5, 2, 3, 3)), dict(groups=2), ValueError, r"groups"),  # out_channels % groups
    ((_t(1, 6, 6, 6), _t(6, 2, 3, 3)), dict(groups=4), ValueError, r"groups|weight"),
    ((X, W), dict(groups=0), ValueError, r"groups"),
    ((X, W), dict(groups=-2), ValueError, r"groups"),
    ((X, W), dict(stride=0, groups=2), ValueError, r"stride"),
    ((X, W), dict(stride=(1, -1), groups=2), ValueError, r"stride"),
    ((X, W), dict(dilation=0, groups=2), ValueError, r"dilation"),
    ((X, W), dict(dilation=(2, -1), groups=2), ValueError, r"dilation"),
    ((X, W), dict(padding=-1, groups=2), ValueError, r"padding"),
    ((X, W), dict(padding=(0, -3), groups=2), ValueError, r"padding"),
    ((X, W), dict(padding="full", groups=2), ValueError, r"padding"),
    ((X, W), dict(padding="SAME", groups=2), ValueError, r"padding"),
    ((X, W), dict(padding="same", stride=2, groups=2), ValueError, r"padding|stride"),
    ((X, _t(6, 2, 7, 3)), dict(groups=2), ValueError, r"input.*kernel_size|kernel_size.*input"),
    ((X, W), dict(dilation=3, groups=2), ValueError, r"input.*kernel_size|kernel_size.*input"),
    ((X, W, _t(5)), dict(groups=2), ValueError, r"bias"),
    ((X, W, _t(6, 1)), dict(groups=2), ValueError, r"bias"),
    ((X, W, _t(6, dtype=torch.float64)), dict(groups=2), TypeError, r"bias"),
    ((X, W.double()), dict(groups=2), TypeError, r"weight"),
    ((X.double(), W), dict(groups=2), TypeError, r"weight"),
    ((X.long(), W.long()), dict(groups=2), TypeError, r"input"),
    ((X, _t(6, 2, 3)), dict(groups=2), ValueError, r"weight"),
    ((X, _t(6, 2, 0, 3)), dict(groups=2), ValueError, r"weight"),
    ((_t(4, 6), W), dict(groups=2), ValueError, r"input"),
    ((_t(1, 1, 4, 6, 6), W), dict(groups=2), ValueError, r"input"),
    (("x", W), {}, TypeError, r"input"),
    ((X, "w"), {}, TypeError, r"weight"),
    ((X, W), dict(stride=1.0, groups=2), TypeError, r"stride"),
    ((X, W), dict(stride=(1, 2, 3), groups=2), TypeError, r"stride"),
    ((X, W), dict(padding=0.5, groups=2), TypeError, r"padding"),
    ((X, W), dict(dilation=True, groups=2), TypeError, r"dilation"),
    ((X, W), dict(groups=2.0), TypeError, r"groups"),
    ((X, W), dict(groups=True), TypeError, r"groups"),
    ((X, W, [0.0] * 6), dict(groups=2), TypeError, r"bias"),
]


def _error_ids(table, match_index):
    return [f"{i}-{row[match_index - 1].__name__}-{re.sub(r'[^A-Za-z_]+', '_', row[match_index]).strip('_')}" for i, row in enumerate(table)]


@pytest.mark.parametrize("args,kwargs,exc,match", CONV2D_ERRORS, ids=_error_ids(CONV2D_ERRORS, 3))
def test_conv2d_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        convt_ext.conv2d(*args, **kwargs)


WT = _t(4, 3, 3, 3)  # conv_transpose2d weight for X: in 4, out 3*groups

CONVT_ERRORS = [
    ((_t(1, 5, 6, 6), WT), {}, ValueError, r"weight|input"),  # channel mismatch
    ((X, WT), dict(groups=3), ValueError, r"groups"),  # in_channels % groups
    ((X, WT), dict(groups=0), ValueError, r"groups"),
    ((X, WT), dict(stride=0), ValueError, r"stride"),
    ((X, WT), dict(stride=(2, -2)), ValueError, r"stride"),
    ((X, WT), dict(dilation=0), ValueError, r"dilation"),
    ((X, WT), dict(padding=-1), ValueError, r"padding"),
    ((X, WT), dict(output_padding=-1), ValueError, r"output_padding"),
    ((X, WT), dict(output_padding=1), ValueError, r"output_padding"),  # stride 1, dilation 1
    ((X, WT), dict(stride=2, output_padding=2), ValueError, r"output_padding"),
    ((X, WT), dict(stride=2, dilation=3, output_padding=(1, 3)), ValueError, r"output_padding"),
    ((X, WT), dict(stride=(3, 1), dilation=(1, 2), output_padding=(2, 2)), ValueError, r"output_padding"),
    ((_t(1, 4, 1, 1), _t(4, 3, 1, 1)), dict(padding=1), ValueError, r"padding|output size"),  # output size < 1
    ((X, WT, _t(4)), {}, ValueError, r"bias"),
    ((X, WT, _t(3, 1)), {}, ValueError, r"bias"),
    ((X, _t(4, 3, 3, 3), _t(3)), dict(groups=2), ValueError, r"bias"),  # out_channels = 6
    ((X, WT, _t(3, dtype=torch.float16)), {}, TypeError, r"bias"),
    ((X, WT.double()), {}, TypeError, r"weight"),
    ((X.half(), WT), {}, TypeError, r"weight"),
    ((X.int(), WT.int()), {}, TypeError, r"input"),
    ((X, _t(4, 3, 3)), {}, ValueError, r"weight"),
    ((_t(4, 6), WT), {}, ValueError, r"input"),
    ((X, None), {}, TypeError, r"weight"),
    ((X, WT), dict(output_padding=0.0), TypeError, r"output_padding"),
    ((X, WT), dict(output_padding=(0, 0, 0)), TypeError, r"output_padding"),
    ((X, WT), dict(groups="1"), TypeError, r"groups"),
    ((X, WT), dict(padding="same"), TypeError, r"padding"),
    ((X, WT), dict(stride=None), TypeError, r"stride"),
    ((X, WT, (0.0, 0.0, 0.0)), {}, TypeError, r"bias"),
]


@pytest.mark.parametrize("args,kwargs,exc,match", CONVT_ERRORS, ids=_error_ids(CONVT_ERRORS, 3))
def test_conv_transpose2d_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        convt_ext.conv_transpose2d(*args, **kwargs)


def test_error_tables_match_torch():
    """The geometry (ValueError) cases above are ones torch rejects as well."""
    for table, fn in ((CONV2D_ERRORS, F.conv2d), (CONVT_ERRORS, F.conv_transpose2d)):
        for args, kwargs, exc, _ in table:
            if exc is TypeError:
                continue
            with pytest.raises((RuntimeError, ValueError)):
                fn(*args, **kwargs)


CONV2D_WEIGHT_ERRORS = [
    # (input, weight_size, grad_output, kwargs, exception, regex)
    (_t(1, 4, 6, 6), (6, 2, 3, 3), _t(1, 6, 4, 4), dict(groups=0), ValueError, r"groups"),
    (_t(1, 4, 6, 6), (6, 4, 3, 3), _t(1, 6, 4, 4), dict(groups=2), ValueError, r"weight_size"),
    (_t(1, 4, 6, 6), (6, 2, 3, 3), _t(1, 5, 4, 4), dict(groups=2), ValueError, r"grad_output"),
    (_t(1, 4, 6, 6), (6, 2, 3, 3), _t(2, 6, 4, 4), dict(groups=2), ValueError, r"grad_output"),
    (_t(1, 4, 6, 6), (6, 2, 3, 3), _t(1, 6, 5, 4), dict(groups=2), ValueError, r"grad_output"),
    (_t(1, 4, 6, 6), (6, 2, 3, 3), _t(1, 6, 4, 4), dict(groups=2, stride=0), ValueError, r"stride"),
    (_t(1, 4, 6, 6), (6, 2, 3, 3), _t(1, 6, 4, 4), dict(groups=2, padding=-1), ValueError, r"padding"),
    (_t(1, 4, 6, 6), (6, 2, 3, 3), _t(1, 6, 4, 4), dict(groups=2, dilation=0), ValueError, r"dilation"),
    (_t(1, 4, 6, 6), (6, 2, 3, 0), _t(1, 6, 4, 4), dict(groups=2), ValueError, r"weight_size"),
    (_t(1, 4, 6, 6), (6, 2, 3), _t(1, 6, 4, 4), dict(groups=2), ValueError, r"weight_size"),
    (_t(1, 4, 6, 6), (6, 2, 3, 3), _t(1, 6, 4, 4, dtype=torch.float64), dict(groups=2), TypeError, r"grad_output"),
    (_t(1, 4, 6, 6), (6, 2, 3, 3), "dy", dict(groups=2), TypeError, r"grad_output"),
    (_t(1, 4, 6, 6), 3, _t(1, 6, 4, 4), dict(groups=2), TypeError, r"weight_size"),
]


@pytest.mark.parametrize("x,wsize,dy,kwargs,exc,match", CONV2D_WEIGHT_ERRORS, ids=_error_ids(CONV2D_WEIGHT_ERRORS, 5))
def test_conv2d_weight_errors(x, wsize, dy, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        convt_ext.conv2d_weight(x, wsize, dy, **kwargs)


# ------------------------------------------------------------------ CUDA

CUDA_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CUDA_TOL = {torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 8e-2}  # float32: tests/tf32_bounds.py


def cuda_subset(cases, count=10):
    """The CUDA tests' cases: every 7th case with data (7 is prime to the tables' batch cycles, so
    the batches vary), plus a 1x1 and a grouped case where that stride missed them."""
    pool = computing(cases)
    subset = pool[::7][:count]
    for wanted in (lambda c: tuple(c["k"]) == (1, 1), lambda c: c["groups"] > 1, lambda c: (c["batch"] or 0) >= 2):
        if not any(wanted(c) for c in subset):
            subset.append(next(c for c in pool if wanted(c)))
    return subset


CUDA_CONV_CASES = {False: cuda_subset(CONV2D_CASES), True: cuda_subset(CONVT_CASES + CONVT_OP_CASES)}


@pytest.mark.parametrize("transposed", [False, True])
def test_cuda_case_tables_have_data(transposed):
    """The CUDA subsets compute: every case has data, several batch sizes (batch >= 2 reaches the
    wide path, which a GPU takes for any batch of two or more), groups and a 1x1 kernel."""
    cases = CUDA_CONV_CASES[transposed]
    assert len(cases) >= 10 and all(c["batch"] != 0 for c in cases)
    assert len({c["batch"] for c in cases}) >= 3, [c["batch"] for c in cases]
    assert any((c["batch"] or 0) >= 2 for c in cases)
    assert any(c["groups"] > 1 for c in cases) and any(tuple(c["k"]) == (1, 1) for c in cases)


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("index", range(12))
@pytest.mark.cuda
@requires_cuda
def test_cuda_matches_cpu(index, transposed, dtype):
    cases = CUDA_CONV_CASES[transposed]
    case = cases[index % len(cases)]
    gen = torch.Generator().manual_seed(index)
    x, w, b = _make_conv_tensors(case, transposed, gen, torch.float64)
    if transposed:
        kwargs = dict(stride=case["s"], padding=case["p"], output_padding=case["op"], groups=case["groups"], dilation=case["d"])
        ours, ref = convt_ext.conv_transpose2d, F.conv_transpose2d
    else:
        kwargs = dict(stride=case["s"], padding=case["p"], dilation=case["d"], groups=case["groups"])
        ours, ref = convt_ext.conv2d, F.conv2d
    tol = CUDA_TOL.get(dtype)
    if dtype == torch.float32:  # the values the GPU sees, so that the allowance is its own
        x, w, b = (None if t is None else t.float().double() for t in (x, w, b))
    leaves = [None if t is None else t.to("cuda", dtype).requires_grad_() for t in (x, w, b)]
    y = ours(*leaves, **kwargs)
    assert y.device.type == "cuda" and y.dtype == dtype
    ref_leaves = [None if t is None else t.clone().requires_grad_() for t in (x, w, b)]
    y_ref = ref(*ref_leaves, **kwargs)
    g = randn(y_ref.shape, gen)
    got = torch.autograd.grad(y, [t for t in leaves if t is not None], g.to("cuda", dtype))
    if dtype == torch.float32:
        # Torch's default flags: the GEMMs run in TF32 (Note [TF32 tolerance]).
        g = g.float().double()
        fn = lambda *a: ref(*((a + (None,)) if b is None else a), **kwargs)  # noqa: E731
        refs = reference(fn, [t for t in (x, w, b) if t is not None], g)
        for name, t, (r, sq, n) in zip(("output", "grad_input", "grad_weight", "grad_bias"), [y] + list(got), refs):
            check_within(t, r, sq, n, torch.backends.cudnn.conv.fp32_precision == "tf32", name)
        return
    scale = max(1.0, y_ref.abs().max().item()) if y_ref.numel() else 1.0
    torch.testing.assert_close(y.double().cpu(), y_ref.detach(), rtol=tol, atol=tol * scale)
    want = torch.autograd.grad(y_ref, [t for t in ref_leaves if t is not None], g)
    for a, r in zip(got, want):
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        torch.testing.assert_close(a.double().cpu(), r, rtol=tol, atol=tol * scale)


@pytest.mark.cuda
@requires_cuda
def test_cuda_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = randn((2, 4, 5, 4), gen, device="cuda").requires_grad_()
    w = randn((4, 2, 3, 2), gen, device="cuda").requires_grad_()
    b = randn((4,), gen, device="cuda").requires_grad_()
    f = lambda x, w, b: convt_ext.conv2d(x, w, b, (2, 1), 1, (1, 2), 2)  # noqa: E731
    assert gradcheck(f, (x, w, b)) and gradgradcheck(f, (x, w, b))
    wt = randn((4, 1, 2, 2), gen, device="cuda").requires_grad_()
    bt = randn((2,), gen, device="cuda").requires_grad_()
    f = lambda x, w, b: convt_ext.conv_transpose2d(x, w, b, 1, 0, 2, 2, 3)  # noqa: E731
    assert gradcheck(f, (x, wt, bt)) and gradgradcheck(f, (x, wt, bt))


@pytest.mark.cuda
@requires_cuda
def test_cuda_device_mismatch_is_rejected():
    x = torch.zeros(1, 2, 5, 5, device="cuda")
    with pytest.raises(ValueError, match="weight"):
        convt_ext.conv2d(x, torch.zeros(2, 2, 3, 3))
    with pytest.raises(ValueError, match="bias"):
        convt_ext.conv2d(x, torch.zeros(2, 2, 3, 3, device="cuda"), torch.zeros(2))
