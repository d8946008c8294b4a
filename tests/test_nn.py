"""convt_ext.nn.Conv2d / ConvTranspose2d: drop-in parity with torch.nn (outputs and every
gradient), output_size, state_dict both ways, repr, from_torch, argument validation and
torch.compile(fullgraph=True), eager and dynamic. Then the 1-d and 3-d modules, Unfold / Fold,
and the lazy modules (on torch's own module_db inputs too).

Every expected value comes from the torch.nn module with the same parameters (or from eager
mode, for the compiled runs), never from convt_ext's own output."""
import pytest
import torch
from torch.nn.modules.lazy import LazyModuleMixin
from torch.utils._python_dispatch import TorchDispatchMode

import convt_ext
from convt_ext import nn as cnn

# torch.nn's own reference modules warn about 'same' padding with even kernels.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

DT = torch.float64
ATOL = 1e-10
RTOL = 1e-10

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def build_pair(torch_cls, our_cls, args, kwargs, via, seed=0):
    """A seeded torch module and ours with its parameters, copied through from_torch or
    load_state_dict(strict=True)."""
    torch.manual_seed(seed)
    ref = torch_cls(*args, **kwargs, dtype=DT)
    if via == "from_torch":
        ours = our_cls.from_torch(ref)
    else:
        ours = our_cls(*args, **kwargs, dtype=DT)
        ours.load_state_dict(ref.state_dict(), strict=True)
    assert type(ours) is our_cls
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    return ours, ref


def run_and_grads(module, x, upstream, **fwd):
    """Output and the gradients of <module(x), upstream> wrt x and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x, **fwd)
    params = [p for _, p in module.named_parameters()]
    got = torch.autograd.grad(out, [x] + params, upstream)
    return out.detach(), got


def check_parity(ours, ref, input_shape, seed=1, device="cpu", **fwd):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=gen, dtype=DT).to(device)
    out_ref = ref(x, **fwd)
    upstream = torch.randn(out_ref.shape, generator=gen, dtype=DT).to(device)
    expected, expected_grads = run_and_grads(ref, x, upstream, **fwd)
    got, got_grads = run_and_grads(ours, x, upstream, **fwd)
    assert got.shape == expected.shape
    close(got, expected)
    assert len(got_grads) == len(expected_grads)
    for g, e in zip(got_grads, expected_grads):
        close(g, e)
    return got


class OpLog(TorchDispatchMode):
    """Records the ops that reach the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------ Conv2d parity

# (in, out, kernel_size, kwargs, input shape)
CONV_CASES = [
    (3, 4, 3, {}, (2, 3, 7, 8)),
    (3, 5, 3, dict(stride=2, padding=1), (2, 3, 9, 8)),
    (2, 3, (3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (2, 2, 9, 10)),
    (4, 6, 3, dict(groups=2, padding=2, dilation=2), (2, 4, 8, 7)),
    (4, 8, 3, dict(groups=4, stride=(1, 2)), (1, 4, 6, 9)),
    (3, 4, 2, dict(stride=3, padding=1, bias=False), (2, 3, 10, 11)),
    (3, 4, 4, dict(padding="same"), (2, 3, 7, 6)),
    (3, 4, (4, 3), dict(padding="same", dilation=(1, 2)), (2, 3, 8, 9)),
    (4, 4, 3, dict(padding="same", groups=2, bias=False), (2, 4, 5, 5)),
    (3, 4, 3, dict(padding="valid", stride=2), (2, 3, 8, 9)),
    (3, 4, 3, dict(padding="valid"), (3, 7, 8)),  # unbatched
    (3, 4, 3, dict(stride=2, padding=1), (3, 9, 8)),  # unbatched
    (3, 4, 4, dict(padding="same"), (3, 6, 7)),  # unbatched, asymmetric 'same'
]

PAD_MODE_CASES = [
    (3, 4, 3, dict(padding=1), (2, 3, 7, 8)),
    (3, 4, 3, dict(padding=(2, 1), stride=2), (2, 3, 7, 8)),
    (4, 6, 3, dict(padding=(1, 2), dilation=(2, 1), groups=2, bias=False), (2, 4, 8, 7)),
    (3, 4, 3, dict(padding="same"), (2, 3, 6, 7)),
    (3, 4, 4, dict(padding="same"), (2, 3, 6, 7)),  # asymmetric: torch pads the high side more
    (3, 4, (2, 4), dict(padding="same", dilation=(3, 1)), (2, 3, 8, 7)),
    (3, 4, 3, dict(padding="valid"), (2, 3, 6, 7)),
    (3, 4, 3, dict(padding=1), (3, 6, 7)),  # unbatched
    (3, 4, 4, dict(padding="same"), (3, 6, 7)),  # unbatched, asymmetric
]


def _case_id(case):
    cin, cout, k, kw, shape = case
    return f"{cin}-{cout}-k{k}-" + ",".join(f"{a}={b}" for a, b in kw.items()) + f"-x{list(shape)}"


@pytest.mark.parametrize("via", ["from_torch", "load_state_dict"])
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv2d_parity(case, via):
    cin, cout, k, kw, shape = case
    ours, ref = build_pair(torch.nn.Conv2d, cnn.Conv2d, (cin, cout, k), kw, via)
    check_parity(ours, ref, shape)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("case", PAD_MODE_CASES, ids=_case_id)
def test_conv2d_padding_modes(case, padding_mode):
    cin, cout, k, kw, shape = case
    via = "from_torch" if padding_mode in ("zeros", "reflect") else "load_state_dict"
    ours, ref = build_pair(torch.nn.Conv2d, cnn.Conv2d, (cin, cout, k), dict(kw, padding_mode=padding_mode), via)
    assert ours.padding_mode == padding_mode
    check_parity(ours, ref, shape)


def test_padding_mode_matters():
    """The padding-mode parity tests can fail: the four modes give four different results."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 6, dtype=DT)
    outs = []
    for mode in ["zeros", "reflect", "replicate", "circular"]:
        torch.manual_seed(0)
        outs.append(cnn.Conv2d(2, 3, 3, padding=1, padding_mode=mode, dtype=DT)(x))
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(outs[i], outs[j])


# ------------------------------------------------------------------ ConvTranspose2d parity

TCONV_CASES = [
    (3, 4, 3, {}, (2, 3, 5, 6)),
    (3, 5, 4, dict(stride=2, padding=1), (2, 3, 5, 4)),
    (3, 4, 3, dict(stride=2, padding=1, output_padding=1), (2, 3, 5, 6)),
    (2, 3, (3, 2), dict(stride=(2, 3), padding=(1, 0), output_padding=(1, 2)), (2, 2, 4, 5)),
    (4, 6, 3, dict(groups=2, dilation=2, padding=1), (2, 4, 5, 4)),
    (4, 4, 3, dict(groups=4, stride=2, bias=False), (1, 4, 4, 5)),
    # output_padding >= stride but < dilation (allowed by torch)
    (3, 4, 3, dict(dilation=2, output_padding=1), (2, 3, 4, 5)),
    (2, 4, (2, 3), dict(stride=(1, 3), dilation=(3, 1), padding=(2, 1), output_padding=(2, 1), groups=2), (2, 2, 5, 4)),
    (3, 4, 4, dict(stride=2, padding=1, bias=False), (3, 5, 6)),  # unbatched
    (3, 4, 3, dict(stride=2, output_padding=1, dilation=2), (3, 4, 5)),  # unbatched
]


@pytest.mark.parametrize("via", ["from_torch", "load_state_dict"])
@pytest.mark.parametrize("case", TCONV_CASES, ids=_case_id)
def test_conv_transpose2d_parity(case, via):
    cin, cout, k, kw, shape = case
    ours, ref = build_pair(torch.nn.ConvTranspose2d, cnn.ConvTranspose2d, (cin, cout, k), kw, via)
    check_parity(ours, ref, shape)


@pytest.mark.parametrize("cls", [cnn.Conv2d, cnn.ConvTranspose2d])
def test_forward_uses_convt_ext_ops(cls):
    """The modules compute with torch.ops.convt_ext, not aten's convolution."""
    m = cls(2, 3, 3, stride=2, dtype=DT)
    x = torch.randn(1, 2, 6, 6, dtype=DT, requires_grad=True)
    with OpLog() as log:
        m(x).sum().backward()
    want = "convt_ext.conv2d" if cls is cnn.Conv2d else "convt_ext.conv_transpose2d"
    assert want in log.ops, log.ops
    # conv_transpose's two gradients come from one op sharing their columns.
    grads = "convt_ext.conv2d_weight" if cls is cnn.Conv2d else "convt_ext._conv_transpose_backward"
    assert grads in log.ops, log.ops
    assert not any("convolution" in op for op in log.ops), log.ops


def test_same_seed_same_initialisation():
    """Constructed directly (no copying), the modules draw the same parameters as torch's."""
    for torch_cls, our_cls, kw in [
        (torch.nn.Conv2d, cnn.Conv2d, dict(stride=2, groups=2, padding_mode="reflect", padding=1)),
        (torch.nn.ConvTranspose2d, cnn.ConvTranspose2d, dict(stride=2, groups=2, output_padding=1)),
    ]:
        torch.manual_seed(123)
        ref = torch_cls(4, 6, (3, 2), **kw, dtype=DT)
        torch.manual_seed(123)
        ours = our_cls(4, 6, (3, 2), **kw, dtype=DT)
        sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
        assert list(sd_ours) == list(sd_ref) == ["weight", "bias"]
        for key in sd_ref:
            assert torch.equal(sd_ours[key], sd_ref[key])
        x = torch.randn(2, 4, 6, 5, dtype=DT)
        close(ours(x), ref(x))


def test_gradcheck_small():
    """Double precision finite differences through both modules, second order too."""
    torch.manual_seed(0)
    conv = cnn.Conv2d(1, 2, 2, stride=2, padding=1, padding_mode="circular", dtype=DT)
    up = cnn.ConvTranspose2d(2, 1, 2, stride=2, padding=1, output_padding=1, dtype=DT)
    x = torch.randn(1, 1, 4, 3, dtype=DT, requires_grad=True)
    fn = lambda x, w1, b1, w2, b2: torch.func.functional_call(  # noqa: E731
        torch.nn.Sequential(conv, torch.nn.Tanh(), up),
        {"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": b2},
        (x,),
    )
    inputs = (x,) + tuple(p.detach().clone().requires_grad_(True) for p in (conv.weight, conv.bias, up.weight, up.bias))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# ------------------------------------------------------------------ output_size


def _tconv_pair(**kw):
    return build_pair(torch.nn.ConvTranspose2d, cnn.ConvTranspose2d, (4, 6, 3), kw, "from_torch")


@pytest.mark.parametrize(
    "kw, shape, output_size",
    [
        (dict(stride=2, padding=1), (2, 4, 5, 6), [9, 11]),  # the smallest sizes
        (dict(stride=2, padding=1), (2, 4, 5, 6), [10, 12]),  # the largest
        (dict(stride=2, padding=1), (2, 4, 5, 6), [10, 11]),
        (dict(stride=2, padding=1), (2, 4, 5, 6), [2, 6, 10, 12]),  # with batch and channels
        (dict(stride=2, padding=1), (2, 4, 5, 6), torch.Size([2, 6, 9, 12])),
        (dict(stride=2, padding=1), (2, 4, 5, 6), (10, 12)),
        (dict(stride=(3, 2), dilation=2, groups=2), (2, 4, 4, 5), [14, 13]),
        (dict(stride=(3, 2), dilation=2, groups=2), (2, 4, 4, 5), [2, 6, 16, 14]),
        (dict(stride=(3, 2), padding=1, output_padding=(1, 0)), (2, 4, 4, 5), [10, 10]),  # output_size wins
        (dict(stride=2, padding=1), (4, 5, 6), [10, 11]),  # unbatched
        (dict(stride=2, padding=1), (4, 5, 6), [6, 9, 12]),  # unbatched, with channels
    ],
)
def test_conv_transpose2d_output_size(kw, shape, output_size):
    ours, ref = _tconv_pair(**kw)
    out = check_parity(ours, ref, shape, output_size=output_size)
    assert list(out.shape[-2:]) == list(output_size)[-2:]


@pytest.mark.parametrize(
    "shape, output_size",
    [
        ((2, 4, 5, 6), [8, 11]),  # too small
        ((2, 4, 5, 6), [10, 13]),  # too large
        ((2, 4, 5, 6), [10]),  # one element
        ((2, 4, 5, 6), [6, 10, 12]),  # three elements for a batched input
        ((2, 4, 5, 6), [1, 2, 6, 10, 12]),
        ((4, 5, 6), [2, 6, 10, 12]),  # four elements for an unbatched input
    ],
)
def test_conv_transpose2d_invalid_output_size(shape, output_size):
    ours, ref = _tconv_pair(stride=2, padding=1)
    x = torch.randn(shape, dtype=DT)
    with pytest.raises(ValueError) as expected:
        ref(x, output_size=output_size)
    with pytest.raises(ValueError) as got:
        ours(x, output_size=output_size)
    assert str(got.value) == str(expected.value)


# ------------------------------------------------------------------ state_dict, repr, from_torch

MODULE_CONFIGS = [
    (torch.nn.Conv2d, cnn.Conv2d, (3, 6, 3), dict(stride=2, padding=1, groups=3)),
    (torch.nn.Conv2d, cnn.Conv2d, (3, 4, (2, 3)), dict(padding="same", padding_mode="replicate", bias=False)),
    (torch.nn.ConvTranspose2d, cnn.ConvTranspose2d, (4, 6, 4), dict(stride=2, padding=1, dilation=2, output_padding=1)),
    (torch.nn.ConvTranspose2d, cnn.ConvTranspose2d, (4, 2, 3), dict(groups=2, bias=False)),
]
CONFIG_IDS = ["conv", "conv-same-replicate-nobias", "tconv", "tconv-groups-nobias"]


@pytest.mark.parametrize("torch_cls, our_cls, args, kw", MODULE_CONFIGS, ids=CONFIG_IDS)
def test_state_dict_round_trip(torch_cls, our_cls, args, kw):
    torch.manual_seed(1)
    ref = torch_cls(*args, **kw, dtype=DT)
    torch.manual_seed(2)  # different parameters, so loading has something to do
    ours = our_cls(*args, **kw, dtype=DT)
    x = torch.randn(2, args[0], 6, 7, dtype=DT)

    # torch -> ours
    assert not torch.equal(ours.weight, ref.weight)
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    close(ours(x), ref(x))

    # ours -> torch
    torch.manual_seed(3)
    ours2 = our_cls(*args, **kw, dtype=DT)
    fresh = torch_cls(*args, **kw, dtype=DT)
    assert list(ours2.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(ours2.state_dict(), strict=True)
    close(fresh(x), ours2(x))
    for key, value in ours2.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
        assert value.shape == fresh.state_dict()[key].shape


def test_state_dict_mismatch_raises():
    """strict loading still checks keys and shapes, as in torch."""
    ours = cnn.Conv2d(3, 4, 3, bias=False)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        ours.load_state_dict(torch.nn.Conv2d(3, 4, 3).state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        cnn.ConvTranspose2d(3, 4, 3).load_state_dict(torch.nn.ConvTranspose2d(4, 3, 3).state_dict())


@pytest.mark.parametrize("torch_cls, our_cls, args, kw", MODULE_CONFIGS, ids=CONFIG_IDS)
def test_repr(torch_cls, our_cls, args, kw):
    ours, ref = our_cls(*args, **kw), torch_cls(*args, **kw)
    assert repr(ours) == repr(ref)
    text = repr(ours)
    assert text.startswith(our_cls.__name__ + f"({args[0]}, {args[1]}, kernel_size=")
    for name, value in kw.items():
        if name == "bias":
            assert "bias=False" in text
        elif name in ("padding_mode", "padding") and isinstance(value, str):
            assert f"{name}={value}" in text
        else:
            assert f"{name}=" in text


def test_repr_is_not_trivially_equal():
    assert repr(cnn.Conv2d(3, 4, 3, stride=2)) != repr(cnn.Conv2d(3, 4, 3))
    assert "output_padding=(1, 1)" in repr(cnn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("torch_cls, our_cls, args, kw", MODULE_CONFIGS, ids=CONFIG_IDS)
def test_from_torch(torch_cls, our_cls, args, kw, dtype):
    torch.manual_seed(0)
    ref = torch_cls(*args, **kw, dtype=dtype)
    ref.weight.requires_grad_(False)
    ref.eval()
    rng_before = torch.get_rng_state()
    ours = our_cls.from_torch(ref)
    assert torch.equal(torch.get_rng_state(), rng_before)  # from_torch draws no random numbers
    assert type(ours) is our_cls and isinstance(ours, torch_cls)
    assert not ours.training
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "output_padding", "groups", "padding_mode", "transposed"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert repr(ours) == repr(ref)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert isinstance(p, torch.nn.Parameter)
        assert p.dtype == q.dtype == dtype and p.device == q.device, name
        assert p.requires_grad == q.requires_grad, name
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    assert ours.weight.requires_grad is False
    assert (ours.bias is None) == (ref.bias is None)

    # Copies: mutating ours leaves the original alone, and the other way round.
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k
    mine = {k: v.clone() for k, v in ours.state_dict().items()}
    with torch.no_grad():
        ref.weight.mul_(2.0)
    assert torch.equal(ours.weight, mine["weight"])

    # The forward agrees in the module's own dtype.
    x = torch.randn(2, args[0], 6, 7, dtype=dtype)
    ours2 = our_cls.from_torch(ref)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours2(x), ref(x), atol=tol, rtol=tol)


def test_from_torch_keeps_meta_device():
    ref = torch.nn.ConvTranspose2d(3, 5, 3, stride=2, device="meta", dtype=torch.float16)
    ours = cnn.ConvTranspose2d.from_torch(ref)
    for p in ours.parameters():
        assert p.device.type == "meta" and p.dtype == torch.float16


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("torch_cls, our_cls, args, kw", MODULE_CONFIGS, ids=CONFIG_IDS)
def test_from_torch_cuda(torch_cls, our_cls, args, kw):
    if not convt_ext.build_info()["cuda"]:
        pytest.skip("convt_ext was built without its CUDA path")
    torch.manual_seed(0)
    ref = torch_cls(*args, **kw, dtype=DT, device="cuda")
    ours = our_cls.from_torch(ref)
    assert all(p.is_cuda for p in ours.parameters())
    check_parity(ours, ref, (2, args[0], 6, 7), device="cuda")


def test_from_torch_accepts_our_own_modules_and_subclasses():
    torch.manual_seed(0)
    ours = cnn.Conv2d(3, 4, 3, padding_mode="circular", padding=1)
    again = cnn.Conv2d.from_torch(ours)
    assert repr(again) == repr(ours) and torch.equal(again.weight, ours.weight)


def test_from_torch_rejects():
    with pytest.raises(TypeError, match="Conv2d"):
        cnn.Conv2d.from_torch(torch.nn.ConvTranspose2d(3, 4, 3))
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        cnn.ConvTranspose2d.from_torch(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError):
        cnn.Conv2d.from_torch(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="uninitialized"):
        cnn.Conv2d.from_torch(torch.nn.LazyConv2d(4, 3))


def test_public_names():
    assert convt_ext.nn.Conv2d is cnn.Conv2d and convt_ext.nn.ConvTranspose2d is cnn.ConvTranspose2d
    for cls in (cnn.Conv2d, cnn.ConvTranspose2d):
        assert "drop-in" in cls.__doc__ and "convt_ext" in cls.__doc__
        assert cls.from_torch.__doc__
    for name in ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"):
        lazy = getattr(convt_ext.nn, "Lazy" + name)
        assert "Lazy" + name in cnn.__all__ and lazy.cls_to_become is getattr(cnn, name)
        assert issubclass(lazy, getattr(torch.nn, "Lazy" + name)) and "drop-in" in lazy.__doc__
        assert "uninitialized" in lazy.from_torch.__doc__.lower()


# ------------------------------------------------------------------ argument validation (torch's own)


def _same_error(make_ref, make_ours, exc=ValueError):
    with pytest.raises(exc) as expected:
        make_ref()
    with pytest.raises(exc) as got:
        make_ours()
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize(
    "kw",
    [
        dict(padding="same", stride=2),
        dict(padding="full"),
        dict(padding_mode="mirror"),
        dict(groups=2),  # 3 input channels
        dict(groups=0),
    ],
)
def test_conv2d_constructor_errors_are_torchs(kw):
    _same_error(lambda: torch.nn.Conv2d(3, 4, 3, **kw), lambda: cnn.Conv2d(3, 4, 3, **kw))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_transpose2d_only_zeros_padding(mode):
    _same_error(
        lambda: torch.nn.ConvTranspose2d(3, 4, 3, padding_mode=mode),
        lambda: cnn.ConvTranspose2d(3, 4, 3, padding_mode=mode),
    )
    # Changed after construction: the forward refuses, as torch's does.
    ref, ours = torch.nn.ConvTranspose2d(3, 4, 3), cnn.ConvTranspose2d(3, 4, 3)
    ref.padding_mode = ours.padding_mode = mode
    x = torch.randn(1, 3, 4, 4)
    _same_error(lambda: ref(x), lambda: ours(x))


def test_bad_output_padding_raises_at_forward():
    """torch checks output_padding < max(stride, dilation) in the forward, not the constructor."""
    ours = cnn.ConvTranspose2d(2, 3, 3, stride=1, output_padding=1)
    with pytest.raises((ValueError, RuntimeError)):
        torch.nn.ConvTranspose2d(2, 3, 3, stride=1, output_padding=1)(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="output_padding"):
        ours(torch.randn(1, 2, 4, 4))


# ------------------------------------------------------------------ torch.compile


def _encoder_decoder(conv=cnn.Conv2d, tconv=cnn.ConvTranspose2d):
    return torch.nn.Sequential(
        conv(3, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        conv(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        tconv(16, 8, 4, stride=2, padding=1),
        torch.nn.ReLU(),
        tconv(8, 3, 4, stride=2, padding=1),
    ).to(DT)


def _forward_backward(model, x, upstream):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(upstream)
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), grads


class GraphRecorder:
    """A backend that keeps each Dynamo graph's code and hands it on to `backend`."""

    def __init__(self, backend):
        self.backend = backend
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm.code)
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)


def _check_compiled(backend, dynamic, sizes):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _encoder_decoder()
    reference = _encoder_decoder(torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    reference.load_state_dict(model.state_dict(), strict=True)

    # No graph breaks: one graph, per explain and per fullgraph=True below.
    x0 = torch.randn(sizes[0], dtype=DT)
    explanation = torch._dynamo.explain(model)(x0)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()

    recorder = GraphRecorder(backend)
    compiled = torch.compile(model, backend=recorder, fullgraph=True, dynamic=dynamic)
    for i, size in enumerate(sizes):
        gen = torch.Generator().manual_seed(10 + i)
        x = torch.randn(size, generator=gen, dtype=DT)
        upstream = torch.randn(size, generator=gen, dtype=DT)  # the autoencoder keeps the size
        got, got_grads = _forward_backward(compiled, x, upstream)
        eager, eager_grads = _forward_backward(model, x, upstream)
        ref, ref_grads = _forward_backward(reference, x, upstream)
        assert got.shape == eager.shape == ref.shape == x.shape
        close(got, eager)
        close(got, ref)
        assert got_grads.keys() == eager_grads.keys() and len(got_grads) == 8
        for name in eager_grads:
            close(got_grads[name], eager_grads[name])
            close(got_grads[name], ref_grads[name])
    # The compiled graph calls convt_ext's ops (not aten's convolution), and with
    # dynamic=True a second input size reuses the first graph.
    assert len(recorder.graphs) == (1 if dynamic else len(sizes))
    code = recorder.graphs[0]
    assert "convt_ext.conv2d" in code and "convt_ext.conv_transpose2d" in code, code
    assert "convolution" not in code and "F.conv" not in code
    torch._dynamo.reset()


def test_compile_dynamic_two_sizes():
    _check_compiled("aot_eager", dynamic=True, sizes=[(2, 3, 16, 20), (3, 3, 24, 12)])


@pytest.mark.slow
def test_compile_inductor():
    """The default backend, as users run it (about 25 s on 2 CPU cores with a cold cache)."""
    _check_compiled("inductor", dynamic=False, sizes=[(2, 3, 16, 16)])


def test_compile_output_size():
    """forward(x, output_size) traces without graph breaks, dynamic shapes included."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = torch.nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, dtype=DT)
    ours = cnn.ConvTranspose2d.from_torch(ref)

    def fn(x, h, w):
        return ours(x, output_size=[h, w])

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape, out in [((2, 4, 5, 6), (10, 11)), ((1, 4, 7, 4), (13, 8))]:
        x = torch.randn(shape, dtype=DT)
        close(compiled(x, *out), ref(x, output_size=list(out)))
        assert compiled(x, *out).shape[-2:] == out
    torch._dynamo.reset()


# ------------------------------------------------------------------ 1-d and 3-d modules

TORCH_CONV = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}
OUR_CONV = {1: cnn.Conv1d, 2: cnn.Conv2d, 3: cnn.Conv3d}
TORCH_TCONV = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}
OUR_TCONV = {1: cnn.ConvTranspose1d, 2: cnn.ConvTranspose2d, 3: cnn.ConvTranspose3d}

# (dims, in, out, kernel_size, kwargs, input shape)
CONV_ND_CASES = [
    (1, 3, 4, 3, {}, (2, 3, 9)),
    (1, 4, 6, 3, dict(stride=2, padding=1, dilation=2, groups=2), (2, 4, 11)),
    (1, 3, 4, 4, dict(padding="same", bias=False), (2, 3, 7)),
    (1, 3, 4, 2, dict(stride=3, padding="valid"), (3, 10)),  # unbatched
    (3, 2, 3, 3, {}, (2, 2, 4, 5, 3)),
    (3, 4, 4, (2, 3, 1), dict(stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1), groups=2), (1, 4, 5, 6, 3)),
    (3, 2, 3, (2, 3, 2), dict(padding="same", dilation=(1, 1, 2)), (1, 2, 4, 3, 5)),
    (3, 2, 3, 2, dict(stride=2, padding=1, bias=False), (2, 4, 3, 5)),  # unbatched
]

# (dims, in, out, kernel_size, kwargs, input shape), padding_mode applied on top
PAD_MODE_ND_CASES = [
    (1, 3, 4, 3, dict(padding=2, stride=2), (2, 3, 8)),
    (1, 2, 4, 4, dict(padding="same", groups=2), (2, 2, 7)),  # asymmetric 'same'
    (1, 3, 4, 3, dict(padding=1), (3, 6)),  # unbatched
    (3, 2, 3, 3, dict(padding=(1, 2, 1), dilation=(1, 1, 2)), (1, 2, 4, 4, 5)),
    (3, 2, 3, (2, 3, 2), dict(padding="same"), (1, 2, 3, 4, 4)),  # asymmetric 'same'
    (3, 2, 3, 3, dict(padding=1), (2, 3, 3, 4)),  # unbatched
]

TCONV_ND_CASES = [
    (1, 3, 4, 3, dict(stride=2, padding=1, output_padding=1), (2, 3, 5)),
    (1, 4, 6, 3, dict(groups=2, dilation=3, output_padding=2), (2, 4, 4)),  # output_padding >= stride
    (1, 3, 4, 4, dict(stride=3, padding=1, bias=False), (3, 5)),  # unbatched
    (3, 2, 3, 3, {}, (2, 2, 2, 3, 2)),
    (3, 4, 2, (2, 3, 1), dict(stride=(2, 1, 3), padding=(1, 1, 0), output_padding=(1, 0, 2), groups=2), (1, 4, 3, 2, 3)),
    (3, 2, 3, 2, dict(stride=2, dilation=(1, 2, 1), output_padding=(1, 1, 0), bias=False), (2, 2, 3, 2)),  # unbatched
]


def _nd_id(case):
    dims, cin, cout, k, kw, shape = case
    return f"{dims}d-{cin}-{cout}-k{k}-" + ",".join(f"{a}={b}" for a, b in kw.items()) + f"-x{list(shape)}"


@pytest.mark.parametrize("case", CONV_ND_CASES, ids=_nd_id)
def test_conv_nd_parity(case):
    dims, cin, cout, k, kw, shape = case
    via = "from_torch" if dims == 1 else "load_state_dict"
    ours, ref = build_pair(TORCH_CONV[dims], OUR_CONV[dims], (cin, cout, k), kw, via)
    check_parity(ours, ref, shape)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])  # zeros: test_conv_nd_parity
@pytest.mark.parametrize("case", PAD_MODE_ND_CASES, ids=_nd_id)
def test_conv_nd_padding_modes(case, padding_mode):
    dims, cin, cout, k, kw, shape = case
    ours, ref = build_pair(TORCH_CONV[dims], OUR_CONV[dims], (cin, cout, k), dict(kw, padding_mode=padding_mode), "from_torch")
    assert ours.padding_mode == padding_mode
    check_parity(ours, ref, shape)


@pytest.mark.parametrize("case", TCONV_ND_CASES, ids=_nd_id)
def test_conv_transpose_nd_parity(case):
    dims, cin, cout, k, kw, shape = case
    via = "load_state_dict" if dims == 1 else "from_torch"
    ours, ref = build_pair(TORCH_TCONV[dims], OUR_TCONV[dims], (cin, cout, k), kw, via)
    check_parity(ours, ref, shape)


@pytest.mark.parametrize(
    "dims, shape, output_size",
    [
        (1, (2, 4, 5), [9]),
        (1, (2, 4, 5), [2, 6, 10]),
        (1, (4, 5), [6, 10]),  # unbatched, with channels
        (3, (1, 4, 3, 2, 3), [5, 4, 6]),
        (3, (1, 4, 3, 2, 3), torch.Size([1, 6, 6, 3, 5])),
        (3, (4, 3, 2, 3), (6, 4, 5)),  # unbatched
    ],
)
def test_conv_transpose_nd_output_size(dims, shape, output_size):
    ours, ref = build_pair(TORCH_TCONV[dims], OUR_TCONV[dims], (4, 6, 3), dict(stride=2, padding=1), "from_torch")
    out = check_parity(ours, ref, shape, output_size=output_size)
    assert list(out.shape[-dims:]) == list(output_size)[-dims:]


@pytest.mark.parametrize(
    "dims, shape, output_size",
    [
        (1, (2, 4, 5), [8]),  # too small
        (1, (2, 4, 5), [11]),  # too large
        (1, (2, 4, 5), [4, 9]),  # two elements for a batched 1-d input
        (3, (1, 4, 3, 2, 3), [5, 4]),
        (3, (1, 4, 3, 2, 3), [5, 4, 7]),
        (3, (4, 3, 2, 3), [1, 6, 5, 4, 6]),  # five elements for an unbatched input
    ],
)
def test_conv_transpose_nd_invalid_output_size(dims, shape, output_size):
    ours, ref = build_pair(TORCH_TCONV[dims], OUR_TCONV[dims], (4, 6, 3), dict(stride=2, padding=1), "from_torch")
    x = torch.randn(shape, dtype=DT)
    _same_error(lambda: ref(x, output_size=output_size), lambda: ours(x, output_size=output_size))


@pytest.mark.parametrize("dims", [1, 3])
def test_nd_modules_use_convt_ext_ops(dims):
    """The 1-d and 3-d modules compute with torch.ops.convt_ext, forward and backward."""
    for cls in (OUR_CONV[dims], OUR_TCONV[dims]):
        m = cls(2, 3, 3, stride=2, dtype=DT)
        x = torch.randn(1, 2, *[5] * dims, dtype=DT, requires_grad=True)
        with OpLog() as log:
            m(x).sum().backward()
        assert any(op.startswith("convt_ext.") for op in log.ops), log.ops
        assert not any("convolution" in op for op in log.ops), log.ops


@pytest.mark.parametrize("dims", [1, 3])
def test_nd_modules_same_seed_state_dict_repr(dims):
    """Same initialisation, state_dict keys and repr as torch's; state_dicts load both ways."""
    for torch_cls, our_cls, kw in [
        (TORCH_CONV[dims], OUR_CONV[dims], dict(stride=2, groups=2, padding_mode="circular", padding=1)),
        (TORCH_TCONV[dims], OUR_TCONV[dims], dict(stride=2, groups=2, output_padding=1, bias=False)),
    ]:
        torch.manual_seed(123)
        ref = torch_cls(4, 6, 3, **kw, dtype=DT)
        torch.manual_seed(123)
        ours = our_cls(4, 6, 3, **kw, dtype=DT)
        assert repr(ours) == repr(ref)
        assert repr(ours).startswith(f"{our_cls.__name__}(4, 6, kernel_size={(3,) * dims}, stride={(2,) * dims}")
        assert isinstance(ours, torch_cls) and type(ours).__name__ == torch_cls.__name__
        sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
        assert list(sd_ours) == list(sd_ref)
        for key in sd_ref:
            assert torch.equal(sd_ours[key], sd_ref[key])
        torch.manual_seed(7)
        fresh = torch_cls(4, 6, 3, **kw, dtype=DT)
        fresh.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(2, 4, *[5] * dims, dtype=DT)
        close(ours(x), fresh(x))
        assert "drop-in" in our_cls.__doc__ and "convt_ext" in our_cls.__doc__


@pytest.mark.parametrize("dims", [1, 3])
def test_nd_from_torch(dims):
    ref = TORCH_TCONV[dims](4, 6, 3, stride=2, dilation=2, groups=2, dtype=torch.float32)
    ref.eval()
    ref.bias.requires_grad_(False)
    rng_before = torch.get_rng_state()
    ours = OUR_TCONV[dims].from_torch(ref)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert type(ours) is OUR_TCONV[dims] and not ours.training and not ours.bias.requires_grad
    assert repr(ours) == repr(ref)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    x = torch.randn(2, 4, *[4] * dims)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    conv_ref = TORCH_CONV[dims](4, 6, 2, padding_mode="reflect", padding=1)
    conv = OUR_CONV[dims].from_torch(conv_ref)
    assert repr(conv) == repr(conv_ref) and torch.equal(conv.weight, conv_ref.weight)
    with pytest.raises(TypeError, match=f"Conv{dims}d"):
        OUR_CONV[dims].from_torch(TORCH_TCONV[dims](3, 4, 3))
    with pytest.raises(TypeError, match=f"ConvTranspose{dims}d"):
        OUR_TCONV[dims].from_torch(torch.nn.ConvTranspose2d(3, 4, 3))  # the wrong number of dimensions


@pytest.mark.parametrize("dims", [1, 3])
def test_nd_errors_are_torchs(dims):
    for kw in (dict(padding="same", stride=2), dict(padding_mode="mirror"), dict(groups=2)):
        _same_error(lambda: TORCH_CONV[dims](3, 4, 3, **kw), lambda: OUR_CONV[dims](3, 4, 3, **kw))
    _same_error(
        lambda: TORCH_TCONV[dims](3, 4, 3, padding_mode="reflect"),
        lambda: OUR_TCONV[dims](3, 4, 3, padding_mode="reflect"),
    )
    ref, ours = TORCH_TCONV[dims](3, 4, 3), OUR_TCONV[dims](3, 4, 3)
    ref.padding_mode = ours.padding_mode = "circular"
    x = torch.randn(1, 3, *[4] * dims)
    _same_error(lambda: ref(x), lambda: ours(x))


def test_nd_gradcheck_small():
    """Finite differences through a 1-d and a 3-d pair of modules (second order: test_matrix)."""
    torch.manual_seed(0)
    conv1 = cnn.Conv1d(1, 2, 2, stride=2, padding=1, padding_mode="replicate", dtype=DT)
    up1 = cnn.ConvTranspose1d(2, 1, 2, stride=2, padding=1, output_padding=1, dtype=DT)
    conv3 = cnn.Conv3d(1, 1, 2, padding=(1, 0, 0), padding_mode="circular", dtype=DT)
    up3 = cnn.ConvTranspose3d(1, 1, (1, 2, 1), stride=(1, 2, 1), dtype=DT)
    x1 = torch.randn(1, 1, 5, dtype=DT, requires_grad=True)
    x3 = torch.randn(1, 1, 2, 2, 2, dtype=DT, requires_grad=True)

    def apply(module, x, weight, bias):
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))

    def fn(x1, x3, a, b, c, d, e, f, g, h):
        return apply(up1, apply(conv1, x1, a, b), c, d), apply(up3, apply(conv3, x3, e, f), g, h)

    inputs = (x1, x3, conv1.weight, conv1.bias, up1.weight, up1.bias, conv3.weight, conv3.bias, up3.weight, up3.bias)
    assert torch.autograd.gradcheck(fn, inputs)


# ------------------------------------------------------------------ Unfold / Fold


def one_hot_unfold(x, kernel, dilation, padding, stride):
    """F.unfold generalised to any number of spatial dimensions, computed by torch: a grouped
    F.conv{1,2,3}d with one one-hot kernel per kernel offset (row-major) for every channel."""
    dims, c = len(kernel), x.shape[1]
    k = 1
    for v in kernel:
        k *= v
    one_hot = torch.eye(k, dtype=x.dtype).view(k, 1, *kernel).repeat(c, 1, *[1] * dims)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[dims]
    return conv(x, one_hot, None, stride, padding, dilation, c).flatten(2)


# (kernel_size, dilation, padding, stride, input shape)
UNFOLD_CASES = [
    (3, 1, 1, 2, (2, 3, 6, 7)),  # 2-d, ints, as torch.nn.Unfold
    ((2, 3), (2, 1), (1, 0), (1, 2), (3, 5, 6)),  # 2-d, unbatched
    ((3,), (2,), (1,), (2,), (2, 3, 9)),  # 1-d
    ((1,), 1, 0, 1, (2, 4)),  # 1-d, unbatched
    (2, 1, 1, 2, (1, 2, 3, 4, 5)),  # 3-d from a 5-d input
    ((2, 1, 3), (1, 1, 2), (0, 1, 1), (2, 1, 1), (2, 3, 4, 3, 5)),  # 3-d
]


def _as_tuple(value, dims):
    return tuple(value) if isinstance(value, tuple) else (value,) * dims


@pytest.mark.parametrize("k, d, p, s, shape", UNFOLD_CASES, ids=[str(c[-1]) for c in UNFOLD_CASES])
def test_unfold_fold_modules(k, d, p, s, shape):
    dims = len(k) if isinstance(k, tuple) else (3 if len(shape) == 5 else 2)
    unbatched = len(shape) == dims + 1
    gen = torch.Generator().manual_seed(len(shape) * 10 + dims)
    x = torch.randn(shape, generator=gen, dtype=DT, requires_grad=True)
    xb = x[None] if unbatched else x
    geometry = [_as_tuple(v, dims) for v in (k, d, p, s)]

    unfold = cnn.Unfold(k, d, p, s)
    assert isinstance(unfold, torch.nn.Unfold)
    assert repr(unfold) == repr(torch.nn.Unfold(k, d, p, s))
    cols = unfold(x)
    want = one_hot_unfold(xb, *geometry)
    close(cols, want[0] if unbatched else want)
    if dims == 2:
        close(cols, torch.nn.Unfold(k, d, p, s)(x))

    # Fold is the adjoint: its output is the gradient of <unfold(x), c> with respect to x.
    c = torch.randn(cols.shape, generator=gen, dtype=DT, requires_grad=True)
    size = tuple(shape[-dims:])
    fold = cnn.Fold(size, k, d, p, s)
    assert isinstance(fold, torch.nn.Fold)
    assert repr(fold) == repr(torch.nn.Fold(size, k, d, p, s))
    folded = fold(c)
    (adjoint,) = torch.autograd.grad(one_hot_unfold(xb, *geometry), xb, c[None] if unbatched else c)
    close(folded, adjoint[0] if unbatched else adjoint)
    if dims == 2:
        close(folded, torch.nn.Fold(size, k, d, p, s)(c))

    # The backward of each is the other.
    (gx,) = torch.autograd.grad(cols, x, c)
    close(gx, folded)
    (gc,) = torch.autograd.grad(folded, c, x)
    close(gc, cols)


def test_unfold_fold_in_a_model_state_dict_and_public_names():
    m = torch.nn.Sequential(cnn.Unfold((3,), padding=(1,)), cnn.Fold((6,), (3,), padding=(1,)))
    assert m.state_dict() == {}
    x = torch.randn(2, 3, 6, dtype=DT)
    # Fold(Unfold(x)) multiplies every pixel by the number of windows covering it.
    ones = torch.ones(1, 1, 6, dtype=DT)
    close(m(x), x * m(ones))
    assert m(ones).flatten().tolist() == [2.0, 3.0, 3.0, 3.0, 3.0, 2.0]
    for name in ("Conv1d", "Conv3d", "ConvTranspose1d", "ConvTranspose3d", "Unfold", "Fold"):
        assert getattr(convt_ext.nn, name) is getattr(cnn, name)
        assert name in cnn.__all__


def test_compile_nd_modules():
    """A 3-d model with Unfold/Fold traces into one graph (fullgraph=True) that calls
    convt_ext's ops, and agrees with eager mode, gradients included. (The module code is the
    same for every D.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    k = (2, 2, 2)
    model = torch.nn.Sequential(
        cnn.Conv3d(2, 4, 3, stride=2, padding=1, padding_mode="circular"),
        torch.nn.ReLU(),
        cnn.ConvTranspose3d(4, 2, 4, stride=2, padding=1),
        cnn.Unfold(k, stride=k),
        cnn.Fold((6, 6, 6), k, stride=k),
    ).to(DT)
    recorder = GraphRecorder("aot_eager")
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    x = torch.randn(2, 2, 6, 6, 6, dtype=DT)
    upstream = torch.randn(2, 2, 6, 6, 6, dtype=DT)
    got, got_grads = _forward_backward(compiled, x, upstream)
    want, want_grads = _forward_backward(model, x, upstream)
    close(got, want)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) == 4
    for name in want_grads:
        close(got_grads[name], want_grads[name])
    assert len(recorder.graphs) == 1
    assert "convt_ext" in recorder.graphs[0] and "convolution" not in recorder.graphs[0]
    torch._dynamo.reset()


# ------------------------------------------------------------------ lazy modules

CONV_NAMES = [f"{kind}{d}d" for kind in ("Conv", "ConvTranspose") for d in (1, 2, 3)]
LAZY_NAMES = ["Lazy" + name for name in CONV_NAMES]


def _torch_module_infos(names):
    """torch's own ModuleInfos (common_modules.module_db) for `names`. Importing torch's test
    internals freezes torch.backends' flags (which conftest's TF32 fixtures set) and wraps
    TorchScript's __call__; both are put back, for the rest of the session."""
    frozen = torch.backends.flags_frozen()
    calls = torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__
    from torch.testing._internal.common_modules import module_db

    # The flag is a global of the functions in torch/backends/__init__.py (the module object
    # torch.backends is a wrapper with a __dict__ of its own).
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = not frozen
    torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = calls
    return {info.module_cls.__name__: info for info in module_db if info.module_cls.__name__ in names}


MODULE_INFOS = _torch_module_infos(LAZY_NAMES + CONV_NAMES)


def _module_inputs(name):
    info = MODULE_INFOS[name]
    return info.module_inputs_func(info, device="cpu", dtype=DT, requires_grad=True, training=True)


# (module_db name, index of its ModuleInput), so that each input is a case of its own
MODULE_DB_CASES = [(name, i) for name in MODULE_INFOS for i in range(len(_module_inputs(name)))]


def _first_forwards(module, inputs, fwd_kwargs, seed):
    """The output, and the gradients of <output, upstream> wrt the inputs and then every
    parameter, with torch's RNG seeded first: a lazy module draws its parameters here."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    torch.manual_seed(seed)
    out = module(*inputs, **fwd_kwargs)
    assert out.numel() > 0
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return out.detach(), torch.autograd.grad(out, inputs + list(module.parameters()), upstream)


def check_lazy_parity(name, args, kwargs, inputs, fwd_kwargs):
    """torch.nn.<name> and convt_ext.nn.<name>, built from the same arguments: the same outputs
    and gradients at the first forward (which materializes a lazy module and gives it its
    non-lazy class) and at a second one, computed by convt_ext's ops, and the same state_dict."""
    modules = []
    for cls in (getattr(torch.nn, name), getattr(cnn, name)):
        torch.manual_seed(0)  # where a non-lazy module draws its parameters
        modules.append(cls(*args, **kwargs).to(DT))
    ref, ours = modules
    assert type(ours) is getattr(cnn, name) and repr(ours) == repr(ref)
    assert ours.has_uninitialized_params() if name.startswith("Lazy") else not isinstance(ours, LazyModuleMixin)
    plain = name.removeprefix("Lazy")
    for seed in (1, 2):
        xs = inputs if seed == 1 else [torch.randn_like(x) for x in inputs]
        want, want_grads = _first_forwards(ref, xs, fwd_kwargs, seed)
        with OpLog() as log:
            got, got_grads = _first_forwards(ours, xs, fwd_kwargs, seed)
        assert any(op.startswith("convt_ext.") for op in log.ops), log.ops
        assert not any("convolution" in op for op in log.ops), log.ops
        assert type(ref) is getattr(torch.nn, plain) and type(ours) is getattr(cnn, plain)
        assert got.shape == want.shape
        close(got, want)
        assert len(got_grads) == len(want_grads) == len(xs) + (2 if ref.bias is not None else 1)
        for g, w in zip(got_grads, want_grads):
            close(g, w)
        sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
        assert list(sd_ours) == list(sd_ref)
        for key, value in sd_ref.items():
            assert sd_ours[key].shape == value.shape and torch.equal(sd_ours[key], value), key
    assert repr(ours) == repr(ref)


def test_module_db_has_inputs():
    """Every conv ModuleInfo is found and gives inputs, and torch's test internals left the
    session's flags as they were."""
    counts = {name: sum(case[0] == name for case in MODULE_DB_CASES) for name in LAZY_NAMES + CONV_NAMES}
    print("module_db inputs per module:", counts)
    assert all(n > 0 for n in counts.values()), counts
    assert not torch.backends.flags_frozen()


@pytest.mark.parametrize("name, index", MODULE_DB_CASES, ids=[f"{n}-{i}" for n, i in MODULE_DB_CASES])
def test_module_db_parity(name, index):
    case = _module_inputs(name)[index]
    ctor, fwd = case.constructor_input, case.forward_input
    check_lazy_parity(name, ctor.args, ctor.kwargs, list(fwd.args), fwd.kwargs)


# (name, constructor args, kwargs, input shape, forward kwargs): what module_db's inputs lack
LAZY_CASES = [
    ("LazyConv1d", (4, 3), dict(stride=2, padding=2, groups=2, padding_mode="circular"), (2, 4, 9), {}),
    ("LazyConv2d", (6, (3, 2)), dict(padding="same", dilation=(1, 2), padding_mode="reflect", bias=False), (3, 7, 8), {}),
    ("LazyConv3d", (4, 2), dict(stride=2, padding=1, groups=2, padding_mode="replicate"), (1, 2, 4, 5, 3), {}),
    ("LazyConvTranspose1d", (6, 3), dict(stride=2, padding=1, dilation=2, groups=2), (2, 4, 5), dict(output_size=[12])),
    ("LazyConvTranspose2d", (4, 4), dict(stride=2, padding=1, output_padding=1, bias=False), (3, 5, 4), {}),
    ("LazyConvTranspose2d", (4, 3), dict(stride=(2, 3), padding=1), (2, 3, 4, 5), dict(output_size=[2, 4, 8, 14])),
    ("LazyConvTranspose3d", (3, 2), dict(stride=2, groups=3), (3, 2, 3, 2), dict(output_size=(5, 7, 4))),
]


@pytest.mark.parametrize("name, args, kw, shape, fwd_kw", LAZY_CASES, ids=[f"{c[0]}-{c[3]}" for c in LAZY_CASES])
def test_lazy_parity(name, args, kw, shape, fwd_kw):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    check_lazy_parity(name, args, kw, [x], fwd_kw)


def test_lazy_from_torch_uninitialized():
    ref = torch.nn.LazyConvTranspose2d(6, 3, stride=2, groups=2, output_padding=1, dtype=DT).eval()
    ref.bias.requires_grad = False
    rng_before = torch.get_rng_state()
    ours = cnn.LazyConvTranspose2d.from_torch(ref)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert type(ours) is cnn.LazyConvTranspose2d and ours.has_uninitialized_params()
    assert repr(ours) == repr(ref) and not ours.training
    assert ours.weight.dtype == DT and ours.weight.requires_grad and not ours.bias.requires_grad
    x = torch.randn(4, 5, 6, dtype=DT)  # unbatched
    for module in (ref, ours):
        torch.manual_seed(3)
        module(x)
    assert type(ours) is cnn.ConvTranspose2d and repr(ours) == repr(ref)
    assert not ours.bias.requires_grad and torch.equal(ours.weight, ref.weight)
    close(ours(x, output_size=[12, 13]), ref(x, output_size=[12, 13]))


def test_lazy_from_torch_materialized():
    """Materialized by load_state_dict but never run: the non-lazy module it is about to become
    (in_channels still 0, as torch's keeps it), with a copy of the parameters."""
    source = torch.nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect", dtype=DT)
    ref = torch.nn.LazyConv1d(6, 3, padding=1, padding_mode="reflect", dtype=DT)
    ref.load_state_dict(source.state_dict())
    ours = cnn.LazyConv1d.from_torch(ref)
    assert type(ours) is cnn.Conv1d
    assert torch.equal(ours.weight, source.weight) and ours.weight.data_ptr() != ref.weight.data_ptr()
    x = torch.randn(2, 4, 7, dtype=DT)
    close(ours(x), ref(x))
    close(ours(x), source(x))
    assert type(ref) is torch.nn.Conv1d and repr(ours) == repr(ref)


def test_lazy_from_torch_rejects():
    with pytest.raises(TypeError, match="LazyConv2d"):
        cnn.LazyConv2d.from_torch(torch.nn.Conv2d(3, 4, 3))  # a lazy module that has run is this
    with pytest.raises(TypeError, match="LazyConv2d"):
        cnn.LazyConv2d.from_torch(torch.nn.LazyConvTranspose2d(4, 3))
    with pytest.raises(TypeError, match="LazyConvTranspose3d"):
        cnn.LazyConvTranspose3d.from_torch(torch.nn.LazyConvTranspose2d(4, 3))
    partial = torch.nn.LazyConv2d(4, 3)
    partial.load_state_dict({"weight": torch.randn(4, 2, 3, 3)}, strict=False)
    with pytest.raises(ValueError, match="only some"):
        cnn.LazyConv2d.from_torch(partial)
    with pytest.raises(ValueError, match="uninitialized"):
        cnn.Conv2d.from_torch(torch.nn.LazyConv2d(4, 3))


@pytest.mark.parametrize("name", LAZY_NAMES)
def test_lazy_errors_are_torchs(name):
    dims = int(name[-2])
    ref, ours = getattr(torch.nn, name)(4, 3, groups=2), getattr(cnn, name)(4, 3, groups=2)
    x = torch.randn(1, 3, *[5] * dims)  # 3 input channels, 2 groups
    _same_error(lambda: ref(x), lambda: ours(x))
    x = torch.randn(*[5] * (dims + 3))  # no dimension count the module takes
    _same_error(lambda: ref(x), lambda: ours(x), RuntimeError)
    if "Transpose" in name:
        _same_error(lambda: getattr(torch.nn, name)(4, 3, padding_mode="reflect"),
                    lambda: getattr(cnn, name)(4, 3, padding_mode="reflect"))
