"""Edge defects found by review, each checked against torch or an exact rule:

- the groups arithmetic is overflow-checked (a wrapped product once let a
  2**40 * 2**24 weight through);
- degenerate channel and group counts: rejected where torch rejects, and the
  one documented difference (zero input channels keep the weight's
  out_channels) made and tested on purpose;
- the tuning environment variables are validated;
- the core count follows the affinity mask (and cgroup quota);
- the memory-format query fails loudly on what it does not expect;
- float32 convolutions follow torch.backends.mkldnn.conv.fp32_precision, never
  the matmul flag, on every engine, and change no flag."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import convt_ext
from convt_ext import _fake

ENGINES = [e for e in ("aten", "onednn", "brgemm") if e in convt_ext.engine_info()["available"]]


@pytest.mark.parametrize("c_in", [0, 2])
def test_groups_product_does_not_wrap(c_in):
    # weight.size(1) * groups = 2**64 wrapped to 0 once: with no input channels the call
    # returned a (1, 0, 3, 3) tensor, with two the message said "weight.size(1)*groups=0".
    # (A weight with at least `groups` channels in dimension 0 cannot make the product
    # overflow, so the rule that torch also has is the one that fires; the product is
    # overflow-checked all the same, as weight_size's is below.)
    w = torch.empty(0, 2**40, 3, 3)
    with pytest.raises(ValueError, match="groups") as info:
        convt_ext.conv2d(torch.zeros(1, c_in, 5, 5), w, groups=2**24)
    assert "=0" not in str(info.value)


def test_conv_weight_groups_product_is_overflow_checked():
    with pytest.raises(ValueError, match=r"weight_size\[1\]\*groups\) overflows int64"):
        convt_ext.conv2d_weight(torch.zeros(1, 0, 5, 5), (2**24, 2**40, 3, 3), torch.zeros(1, 1, 3, 3),
                                groups=2**24)


# ------------------------------------------------------------------ degenerate shapes


def _torch_raises(fn):
    try:
        fn()
    except RuntimeError:
        return True
    return False


@pytest.mark.parametrize(
    "op, torch_op, x, w, groups",
    [
        (convt_ext.conv2d, F.conv2d, (2, 0, 5, 4), (0, 0, 4, 4), 3),
        (convt_ext.conv2d, F.conv2d, (2, 3, 5, 4), (2, 1, 3, 3), 3),
        (convt_ext.conv1d, F.conv1d, (1, 4, 7), (2, 2, 3), 4),
        (convt_ext.conv_transpose2d, F.conv_transpose2d, (2, 2, 5, 4), (2, 1, 3, 3), 3),
    ],
)
def test_fewer_weight_channels_than_groups_is_rejected_as_torch_does(op, torch_op, x, w, groups):
    x, w = torch.zeros(x), torch.zeros(w)
    assert _torch_raises(lambda: torch_op(x, w, groups=groups))
    with pytest.raises(ValueError, match="groups"):
        op(x, w, groups=groups)


def test_weight_gradient_with_fewer_channels_than_groups_is_rejected():
    with pytest.raises(ValueError, match="groups"):
        convt_ext.conv2d_weight(torch.zeros(2, 0, 5, 4), (0, 0, 4, 4), torch.zeros(2, 0, 2, 1), groups=3)


@pytest.mark.parametrize("batch", [0, 2])
def test_zero_input_channels_keep_the_weights_out_channels(batch):
    """The documented choice (README, Guarantees): a convolution over no input
    channels is the empty sum, so the result has the weight's out_channels and
    holds the bias (or zeros). torch gives 0 channels there instead."""
    x, w, b = torch.zeros(batch, 0, 4, 3), torch.zeros(3, 0, 3, 1), torch.tensor([1.0, -2.0, 0.5])
    theirs = F.conv2d(x, w)
    assert tuple(theirs.shape) == (batch, 0, 2, 3)  # torch's shape, not ours
    ours = convt_ext.conv2d(x, w, b)
    assert tuple(ours.shape) == (batch, 3, 2, 3)
    torch.testing.assert_close(ours, b.view(1, 3, 1, 1).expand(batch, 3, 2, 3), rtol=0, atol=0)
    # And conv_transpose over no input channels (torch rejects the empty weight).
    xt, wt = torch.zeros(batch, 0, 4, 3), torch.zeros(0, 3, 3, 1)
    assert _torch_raises(lambda: F.conv_transpose2d(xt, wt))
    out = convt_ext.conv_transpose2d(xt, wt, b)
    assert tuple(out.shape) == (batch, 3, 6, 3)
    torch.testing.assert_close(out, b.view(1, 3, 1, 1).expand(batch, 3, 6, 3), rtol=0, atol=0)


def test_zero_input_channels_under_torch_compile():
    """The fake kernels make the same choice as the real ones."""
    x, w = torch.zeros(2, 0, 4, 3), torch.zeros(3, 0, 3, 1)
    out = torch.compile(convt_ext.conv2d, fullgraph=True, backend="eager")(x, w)
    assert tuple(out.shape) == (2, 3, 2, 3)
    assert torch.count_nonzero(out) == 0


# ------------------------------------------------------------------ environment variables


def _import_with(env_updates):
    env = dict(os.environ)
    env.update(env_updates)
    return subprocess.run(
        [sys.executable, "-P", "-c", "import convt_ext, torch; print(convt_ext.conv2d(torch.ones(2, 3, 9, 9), torch.ones(4, 3, 3, 3)).sum().item())"],
        env=env, capture_output=True, text=True, timeout=300,
    )


# Every malformed value on one variable, and two on the other: one parser
# (env_bytes in csrc/plan.cpp) reads both.
_MALFORMED = [("CONVT_EXT_CHUNK_BYTES", v) for v in ["8MB", "1e6", "", " 5", "-1", "99999999999999999999999"]] + \
    [("CONVT_EXT_FORWARD_TILE_BYTES", v) for v in ["8MB", "-1"]]
_VALID = [("CONVT_EXT_CHUNK_BYTES", "1"), ("CONVT_EXT_CHUNK_BYTES", "65536"),
          ("CONVT_EXT_FORWARD_TILE_BYTES", "0"), ("CONVT_EXT_FORWARD_TILE_BYTES", "4096")]


@pytest.fixture(scope="module")
def tuning_imports():
    """A fresh import under each tuning variable's setting below, four at a time
    (each is a process of its own; one after another they took most of this
    file's time)."""
    from concurrent.futures import ThreadPoolExecutor

    settings = _MALFORMED + _VALID
    with ThreadPoolExecutor(4) as pool:
        done = pool.map(lambda nv: _import_with({nv[0]: nv[1]}), settings)
        return dict(zip(settings, done))


@pytest.mark.parametrize("name, value", _MALFORMED)
def test_malformed_tuning_variables_fail_at_import(name, value, tuning_imports):
    done = tuning_imports[name, value]
    assert done.returncode != 0
    assert "ValueError" in done.stderr and name in done.stderr, done.stderr


@pytest.mark.parametrize("name, value", _VALID)
def test_valid_tuning_variables_give_the_same_result(name, value, tuning_imports):
    done = tuning_imports[name, value]
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == 2 * 4 * 7 * 7 * 27.0


def test_chunk_bytes_zero_is_refused():
    done = _import_with({"CONVT_EXT_CHUNK_BYTES": "0"})
    assert done.returncode != 0 and "CONVT_EXT_CHUNK_BYTES" in done.stderr


# ------------------------------------------------------------------ the core count


def test_core_count_follows_the_affinity_mask():
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "import convt_ext; print(convt_ext.engine_info()['cores'])"
    )
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 1
    assert 1 <= convt_ext.engine_info()["cores"] <= len(os.sched_getaffinity(0))


# ------------------------------------------------------------------ the memory-format query


def test_memory_format_query_raises_what_it_does_not_expect(monkeypatch):
    x, w = torch.zeros(1, 4, 6, 6), torch.zeros(4, 4, 3, 3)

    def refuse(*args):
        raise RuntimeError("refused by torch")

    monkeypatch.setattr(torch._C, "_select_conv_backend", refuse)
    with pytest.raises(RuntimeError, match="refused by torch"):
        _fake.output_format(x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    # The one expected refusal, conv_transpose over zero input channels, is decided
    # without asking torch.
    assert _fake.output_format(torch.zeros(1, 0, 6, 6), torch.zeros(0, 4, 3, 3), None, [1, 1], [0, 0], [1, 1],
                               True, [0, 0], 1) == torch.contiguous_format


# ------------------------------------------------------------------ float32 precision flags


@pytest.fixture
def restore_precision():
    flags = (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision)
    engine = convt_ext.gemm_engine()
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision = flags
        torch.set_float32_matmul_precision("highest")
        convt_ext.set_gemm_engine(engine)


def _three_ops(x, w, dy):
    return [
        convt_ext.conv2d(x, w, padding=1),
        convt_ext.conv_transpose2d(dy, w, padding=1),
        convt_ext.conv2d_weight(x, w.shape, dy, padding=1),
    ]


def _references(x, w, dy):
    x, w, dy = x.double(), w.double(), dy.double()
    return [
        F.conv2d(x, w, padding=1),
        F.conv_transpose2d(dy, w, padding=1),
        torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1),
    ]


def _errors(got, want):
    return [((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, want)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("matmul_flag", ["medium", "bf16", "tf32"])
def test_matmul_precision_flag_is_not_followed(engine, matmul_flag, restore_precision):
    """torch.backends.mkldnn.matmul.fp32_precision (or set_float32_matmul_precision)
    asks at::mm for bfloat16; a convolution must stay IEEE float32, as F.conv2d does."""
    convt_ext.set_gemm_engine(engine)
    gen = torch.Generator().manual_seed(5)
    x, w, dy = (torch.randn(s, generator=gen) for s in ((4, 32, 17, 15), (24, 32, 3, 3), (4, 24, 17, 15)))
    if matmul_flag == "medium":
        torch.set_float32_matmul_precision("medium")
    else:
        torch.backends.mkldnn.matmul.fp32_precision = matmul_flag
    before = (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision)
    errors = _errors(_three_ops(x, w, dy), _references(x, w, dy))
    assert max(errors) < 1e-5, errors  # bfloat16 would be ~1e-2
    assert (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision) == before
    torch_error = _errors([F.conv2d(x, w, padding=1)], _references(x, w, dy)[:1])[0]
    assert torch_error < 1e-5


@pytest.mark.parametrize("engine", ENGINES)
def test_conv_precision_flag_is_followed(engine, restore_precision):
    """torch.backends.mkldnn.conv.fp32_precision = "bf16": on a CPU with native
    bfloat16 (where oneDNN takes F.conv2d down to it), every float32 GEMM rounds its
    operands to bfloat16; elsewhere float32 stays IEEE, as torch's does."""
    convt_ext.set_gemm_engine(engine)
    gen = torch.Generator().manual_seed(6)
    x, w, dy = (torch.randn(s, generator=gen) for s in ((4, 32, 17, 15), (24, 32, 3, 3), (4, 24, 17, 15)))
    want = _references(x, w, dy)
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    info = convt_ext.engine_info()
    native = info["cpu_native_bf16"]
    assert info["fp32_in_bf16"] == native
    before = info["bf16_calls"]
    errors = _errors(_three_ops(x, w, dy), want)
    ran = convt_ext.engine_info()["bf16_calls"] - before
    # The reference in bfloat16 arithmetic: operands rounded, products summed in float64.
    xb, wb, dyb = (t.bfloat16().float() for t in (x, w, dy))
    rounded = _errors(_references(xb, wb, dyb), want)
    if native:
        assert ran > 0
        for e, r in zip(errors, rounded):
            assert abs(e - r) <= 0.5 * r + 1e-6, (errors, rounded)
    else:
        assert ran == 0
        assert max(errors) < 1e-5, errors
    assert torch.backends.mkldnn.conv.fp32_precision == "bf16"
    # Back to "ieee": IEEE float32 everywhere.
    torch.backends.mkldnn.conv.fp32_precision = "ieee"
    assert not convt_ext.engine_info()["fp32_in_bf16"]
    assert max(_errors(_three_ops(x, w, dy), want)) < 1e-5
