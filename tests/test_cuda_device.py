"""CUDA-only behaviour (issue 11): the ops on a non-default stream, captured in a CUDA graph
and replayed, and on a second device. Skipped without a GPU; every case computes a non-empty
batch and checks values against torch.nn.functional on the same device.
"""
import pytest
import torch
import torch.nn.functional as F

import convt_ext
from conftest import requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]


def _cases(device, dtype=torch.float32):
    """(name, convt_ext function, torch function, inputs) with a batch of 3."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, w, b, wt = r(3, 4, 9, 8), r(6, 2, 3, 3), r(6), r(4, 3, 3, 3)
    cols = F.unfold(r(3, 4, 9, 8), 3, padding=1, stride=2)
    return [
        ("conv2d", lambda x, w, b: convt_ext.conv2d(x, w, b, stride=2, padding=1, groups=2),
         lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, groups=2), (x, w, b)),
        ("conv_transpose2d", lambda x, w: convt_ext.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1),
         lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1), (x, wt)),
        ("im2col", lambda x: convt_ext.im2col(x, 3, padding=1, stride=2),
         lambda x: F.unfold(x, 3, padding=1, stride=2), (x,)),
        ("col2im", lambda c: convt_ext.col2im(c, (9, 8), 3, padding=1, stride=2),
         lambda c: F.fold(c, (9, 8), 3, padding=1, stride=2), (cols,)),
    ]


def _close(got, want):
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", range(4))
def test_on_a_side_stream(index):
    torch.backends.cudnn.allow_tf32 = False
    name, ours, ref, args = _cases("cuda")[index]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ours(*args)
    torch.cuda.current_stream().wait_stream(side)
    _close(got, ref(*args))


@pytest.mark.parametrize("index", range(4))
def test_captured_in_a_cuda_graph_and_replayed(index):
    """Nothing in the ops synchronises with the host, so they capture; a replay on new
    data in the same buffers gives torch's result for that data."""
    torch.backends.cudnn.allow_tf32 = False
    name, ours, ref, args = _cases("cuda")[index]
    static = [a.clone() for a in args]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch.cuda.graphs asks
        ours(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ours(*static)
    for a in static:
        a.copy_(torch.randn_like(a))
    graph.replay()
    torch.cuda.synchronize()
    _close(out, ref(*static))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("index", range(4))
def test_on_the_second_device(index):
    name, ours, ref, args = _cases("cuda:1")[index]
    got = ours(*args)
    assert got.device == torch.device("cuda:1")
    _close(got, ref(*args))
