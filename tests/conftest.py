"""Shared fixtures and helpers for the convt_ext test suite.

Every expected value in this suite comes from torch.nn.functional (or
torch.nn.grad / plain tensor indexing), never from convt_ext itself.

Markers:
    cuda  -- needs a CUDA device; skipped when torch.cuda.is_available() is False
    slow  -- long-running (tens of seconds) but still run by default
"""
import hashlib
import math
import random

import pytest
import torch

import convt_ext

# Use together with @pytest.mark.cuda on every CUDA test.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Note [TF32 settings in the tests]
# Torch's own flags stay as torch sets them: on CUDA, a float32 convolution's
# GEMMs run in TF32 by default (Note [TF32 as a convolution] in csrc/gemm.h),
# and the float32 tests allow for it (tests/tf32_bounds.py). The fixture
# tf32_setting runs a test under each combination of the convolution flag and
# the matmul flag, set through either of torch's two APIs, and puts torch's
# defaults back; set_tf32("neither") gives a test IEEE float32 throughout.
TF32_SETTINGS = {  # name: (convolutions in TF32, at::mm in TF32)
    "default": (True, False),  # torch's defaults: convt_ext calls cuBLAS itself, in TF32
    "both": (True, True),  # matmul by fp32_precision, which made the legacy getter throw
    "matmul_only": (False, True),  # the legacy flags: convt_ext calls cuBLAS, in IEEE
    "neither": (False, False),  # the convolution by fp32_precision: at::mm in IEEE
}


def set_tf32(name):
    b = torch.backends
    reset_tf32()
    if name == "both":
        b.cuda.matmul.fp32_precision = "tf32"
    elif name == "matmul_only":
        b.cudnn.allow_tf32 = False
        b.cuda.matmul.allow_tf32 = True
    elif name == "neither":
        b.cudnn.conv.fp32_precision = "ieee"


def reset_tf32():
    """Torch's defaults: TF32 for cuDNN's convolutions, the matmul precision inherited ("none")."""
    b = torch.backends
    b.cudnn.allow_tf32 = True
    b.cuda.matmul.allow_tf32 = False  # the legacy precision back to "highest"
    b.cuda.matmul.fp32_precision = "none"


def tf32_state():
    """The flags as fp32_precision reads them (the legacy getters throw on mixed settings)."""
    b = torch.backends
    return b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision


DEFAULT_TF32_STATE = tf32_state()


@pytest.fixture(params=list(TF32_SETTINGS))
def tf32_setting(request):
    """Runs the test once per TF32_SETTINGS entry; gives (conv TF32, matmul TF32)."""
    set_tf32(request.param)
    try:
        yield TF32_SETTINGS[request.param]
    finally:
        reset_tf32()

# The default workspace limit as this process started, before any test changed it.
DEFAULT_WORKSPACE_LIMIT = convt_ext.workspace_limit()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped when none is available)")
    config.addinivalue_line("markers", "slow: long-running test (still run by default)")


def _seed_from(text):
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & 0x7FFF_FFFF


@pytest.fixture
def rng(request):
    """A torch.Generator seeded from the test's node id: deterministic per test,
    different across tests. Also seeds the global torch RNG the same way."""
    seed = _seed_from(request.node.nodeid)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    return gen


@pytest.fixture
def pyrng(request):
    """A random.Random seeded from the test's node id (for drawing geometries)."""
    return random.Random(_seed_from(request.node.nodeid))


@pytest.fixture
def restore_workspace_limit():
    """Lets a test change convt_ext's workspace limit; puts the old one back."""
    old = convt_ext.workspace_limit()
    try:
        yield old
    finally:
        convt_ext.set_workspace_limit(old)


def randn(shape, gen, dtype=torch.float64, device="cpu"):
    """Standard normal values from `gen` (always drawn on the CPU in float64 so
    that every device and dtype sees the same numbers)."""
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


LAYOUTS = ("contiguous", "transposed", "sliced", "channels_last", "offset")


def make_tensor(shape, gen, layout="contiguous", dtype=torch.float64, device="cpu"):
    """A random tensor of `shape` with a given memory layout:

    contiguous    -- plain row-major
    transposed    -- the last two dims swapped in memory (a .transpose view)
    sliced        -- every other element of a larger tensor in each of the last
                     two dims (and in the batch dim for 4-d), offset by one
    channels_last -- dim -3 is the fastest-moving one (4-d: torch.channels_last)
    offset        -- contiguous but with a non-zero storage offset

    Tensors with fewer than 2 dims are returned contiguous for every layout
    except "offset"."""
    shape = tuple(shape)
    nd = len(shape)
    if layout == "contiguous" or (nd < 2 and layout != "offset"):
        out = randn(shape, gen, dtype, device)
    elif layout == "transposed":
        base = randn(shape[:-2] + (shape[-1], shape[-2]), gen, dtype, device)
        out = base.transpose(-1, -2)
    elif layout == "sliced":
        big = list(shape)
        big[-1] = 2 * shape[-1] + 1
        big[-2] = 2 * shape[-2] + 1
        index = [slice(None)] * nd
        index[-1] = slice(1, None, 2)
        index[-2] = slice(1, None, 2)
        if nd == 4:
            big[0] = 2 * shape[0]
            index[0] = slice(None, None, 2)
        base = randn(big, gen, dtype, device)
        out = base[tuple(index)]
    elif layout == "channels_last":
        if nd == 4:
            out = randn(shape, gen, dtype, device).contiguous(memory_format=torch.channels_last)
        elif nd >= 3:
            perm_shape = shape[:-3] + (shape[-2], shape[-1], shape[-3])
            base = randn(perm_shape, gen, dtype, device)
            dims = list(range(nd - 3)) + [nd - 1, nd - 3, nd - 2]
            out = base.permute(*dims)
        else:
            out = randn(shape[::-1], gen, dtype, device).t()
    elif layout == "offset":
        numel = 1
        for s in shape:
            numel *= s
        flat = randn((numel + 5,), gen, dtype, device)
        out = flat[5:].view(shape)
    else:
        raise ValueError(layout)
    assert out.shape == shape
    if layout == "offset":
        assert out.storage_offset() == 5
    return out


def assert_unchanged(before, after):
    """Same dtype, shape and values, bit for bit."""
    assert after.dtype == before.dtype and after.shape == before.shape
    assert torch.equal(after, before)


def _u_pairs(spatial, kernel_size, dilation, padding, stride):
    """U's nonzeros (convt_ext.im2col_matrix): (rows k_off*L + l, pixels), and L."""
    rows, pixels = convt_ext.im2col_matrix(tuple(spatial), kernel_size, dilation, padding, stride).coalesce().indices()
    L = math.prod((spatial[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
                  for i in range(len(spatial)))
    return rows, pixels, L


def _wide(t):
    """t in the dtype the U references compute in: its own for floating and complex,
    int64 for integers and bool (whose sums wrap modulo 2^64, as torch.add's)."""
    return t if t.dtype.is_floating_point or t.dtype.is_complex else t.to(torch.int64)


def _narrow(t, dtype):
    """Back to dtype: integers modulo 2^bits, bool as nonzero (a sum of bools is an OR)."""
    return t != 0 if dtype == torch.bool else t.to(dtype)


def u_im2col(x, kernel_size, dilation, padding, stride):
    """im2col of a batched x (N, C, *spatial), any D and dtype, through the nonzeros of
    U: a gather over a list of (row, pixel) pairs, none of the kernels' loops."""
    N, C, *spatial = x.shape
    rows, pixels, L = _u_pairs(spatial, kernel_size, dilation, padding, stride)
    K = math.prod(kernel_size)
    wide = _wide(x)
    flat = torch.zeros(N, C, K * L, dtype=wide.dtype)
    flat[:, :, rows] = wide.reshape(N, C, -1)[:, :, pixels]
    return _narrow(flat.reshape(N, C * K, L), x.dtype)


def u_col2im(cols, size, kernel_size, dilation, padding, stride):
    """col2im of batched columns (N, C*prod(k), L) onto an image of spatial `size`,
    through the nonzeros of U: index_add_ over the (row, pixel) pairs, summed in
    int64 for integers (then wrapped to the dtype) and bool (then nonzero)."""
    N, CK, _ = cols.shape
    rows, pixels, L = _u_pairs(size, kernel_size, dilation, padding, stride)
    C = CK // math.prod(kernel_size)
    wide = _wide(cols)
    image = torch.zeros(N, C, math.prod(size), dtype=wide.dtype)
    image.index_add_(2, pixels, wide.reshape(N, C, -1)[:, :, rows])
    return _narrow(image.reshape(N, C, *size), cols.dtype)


# Integers of each element size: other dtypes compared bit for bit through them.
SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def random_of(dtype, shape, gen, layout="contiguous"):
    """Values of any dtype, spread over its range (the whole range for integers, so that
    sums wrap; normal values rounded to the dtype for floating and complex types, float8
    and complex32 included), contiguous, transposed (the last two dimensions) or at a
    storage offset."""
    if dtype == torch.bool:
        values = torch.rand(shape, generator=gen) < 0.5
    elif dtype.is_complex:
        values = torch.randn(shape, generator=gen, dtype=torch.complex128).to(dtype)
    elif dtype.is_floating_point:
        values = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    else:
        # uint64 from all of int64: its negatives wrap onto the values with the top bit set.
        info = torch.iinfo(torch.int64 if dtype == torch.uint64 else dtype)
        values = torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)
    if layout == "transposed":
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "offset":
        return torch.cat([torch.zeros(5, dtype=dtype), values.flatten()])[5:].view(shape)
    return values


def assert_same(got, want):
    """Bit for bit, also for dtypes torch.equal does not take (compared as integers of their size)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    size = got.element_size()
    if got.dtype.is_complex:
        got, want = torch.view_as_real(got.contiguous().to(torch.complex128)), torch.view_as_real(want.contiguous().to(torch.complex128))
    elif size in SAME_SIZE_INT and got.dtype != torch.bool:
        got, want = got.contiguous().view(SAME_SIZE_INT[size]), want.contiguous().view(SAME_SIZE_INT[size])
    assert torch.equal(got, want)


class Ran:
    """What the calls inside a `with` block ran: the CPU convolution calls of each path
    (engine_info()["path"]["calls"]; ran["depthwise"] or ran.view), their total, and the
    brgemm engine's GEMMs (ran.gemms)."""

    PATHS = ("columns", "view", "depthwise")

    @staticmethod
    def _now():
        import convt_ext

        info = convt_ext.engine_info()
        return {**info["path"]["calls"], "gemms": info["calls"]["brgemm"]}

    def __enter__(self):
        self._before = self._now()
        return self

    def __exit__(self, *exc):
        after = self._now()
        self.delta = {k: v - self._before.get(k, 0) for k, v in after.items()}

    def __getitem__(self, key):
        return self.delta.get(key, 0)

    def __getattr__(self, name):
        if name in self.PATHS or name == "gemms":
            return self[name]
        raise AttributeError(name)

    @property
    def total(self):
        return sum(self[p] for p in self.PATHS)

