"""DistributedDataParallel with convt_ext.nn modules: two processes on loopback train a small
encoder-decoder (Conv2d stride 2 + ReLU + ConvTranspose2d) for 3 SGD steps on a fixed
global batch of 8, split 4/4. The per-step losses (averaged over the ranks) and the final
parameters must equal single-process training of the same model built from torch.nn's
modules, with the same initial parameters, on the whole batch (float64).

gloo on the CPU always; NCCL when there are at least two GPUs.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import requires_cuda

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 3
LR = 0.5


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(mods, device="cpu"):
    """The encoder-decoder, seeded, in float64: the same initial parameters in every process
    and for either set of modules (torch.nn's or convt_ext.nn's)."""
    conv, convt = mods
    torch.manual_seed(1234)
    return torch.nn.Sequential(
        conv(3, 8, 3, stride=2, padding=1, dtype=torch.float64),
        torch.nn.ReLU(),
        convt(8, 3, 3, stride=2, padding=1, output_padding=1, dtype=torch.float64),
    ).to(device)


def _data():
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=gen, dtype=torch.float64)
    return x, y


def _train(model, x, y, steps=STEPS, reduce_loss=None):
    """SGD on mean-squared error; returns the per-step losses (before each update)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        if reduce_loss is not None:
            value = reduce_loss(value)
        losses.append(value.item())
    return losses


def _worker(rank, backend, port, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import convt_ext.nn as cnn

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model((cnn.Conv2d, cnn.ConvTranspose2d), device)
        assert isinstance(model[0], cnn.Conv2d) and isinstance(model[2], cnn.ConvTranspose2d)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if backend == "nccl" else None)
        x, y = _data()
        per = GLOBAL_BATCH // WORLD
        xs = x[rank * per:(rank + 1) * per].to(device)
        ys = y[rank * per:(rank + 1) * per].to(device)

        def mean_over_ranks(v):
            dist.all_reduce(v)
            return v / WORLD

        losses = _train(ddp, xs, ys, reduce_loss=mean_over_ranks)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({"losses": losses, "state": state}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_ddp(backend, tmp_path):
    port = _free_port()
    mp.spawn(_worker, args=(backend, port, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _check(results):
    x, y = _data()
    ref = _model((torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    initial = {k: v.clone() for k, v in ref.state_dict().items()}
    want_losses = _train(ref, x, y)
    want = ref.state_dict()
    # Both ranks hold the same parameters, bit for bit (DDP keeps replicas in sync).
    for k in want:
        assert torch.equal(results[0]["state"][k], results[1]["state"][k]), k
    for r in results:
        assert len(r["losses"]) == STEPS
        torch.testing.assert_close(torch.tensor(r["losses"], dtype=torch.float64),
                                   torch.tensor(want_losses, dtype=torch.float64), rtol=1e-12, atol=1e-14)
        assert r["state"].keys() == want.keys()
        for k in want:
            torch.testing.assert_close(r["state"][k], want[k], rtol=1e-10, atol=1e-12)
    # The test can tell: training moved every parameter, and one rank's half-batch
    # alone (no gradient averaging) ends somewhere else.
    for k in want:
        assert (want[k] - initial[k]).abs().max() > 1e-3, k
    alone = _model((torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    _train(alone, x[: GLOBAL_BATCH // WORLD], y[: GLOBAL_BATCH // WORLD])
    assert any((alone.state_dict()[k] - want[k]).abs().max() > 1e-6 for k in want)
    assert want_losses[-1] < want_losses[0]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_gloo_matches_single_process(tmp_path):
    _check(_run_ddp("gloo", tmp_path))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available(), reason="needs NCCL")
def test_ddp_nccl_matches_single_process(tmp_path):
    _check(_run_ddp("nccl", tmp_path))
