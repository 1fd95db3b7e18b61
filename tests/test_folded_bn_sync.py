"""Batch statistics of folded layers synchronised over 2 CPU processes (gloo)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_qat import QuantConfig, QuantConvBn2d
from lightning_qat.nn import FoldedBatchNorm2d


def make_layer():
    torch.manual_seed(0)
    layer = QuantConvBn2d(3, 4, 3, padding=1, config=QuantConfig())
    for q in (layer.activation_quantizer, layer.weight_quantizer):
        q.enable_fake_quant(False).enable_observer(False)  # compare the BN arithmetic alone
    return layer


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=g) * 2 + 0.5


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    layer = make_layer()
    layer.bn.sync = True
    x = batch()[rank * 4 : (rank + 1) * 4].requires_grad_()
    y = layer(x)
    (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
    torch.save(
        {
            "y": y.detach(),
            "x_grad": x.grad,
            "gamma_grad": layer.bn.weight.grad,
            "running_var": layer.bn.running_var,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def test_two_ranks_with_sync_match_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    layer = make_layer()
    x = batch().requires_grad_()
    y = layer(x)
    (y[:4] * torch.arange(y[:4].numel()).reshape(y[:4].shape).sin()).sum().backward(
        retain_graph=True
    )
    (y[4:] * torch.arange(y[4:].numel()).reshape(y[4:].shape).sin()).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.cat([r["x_grad"] for r in ranks]), x.grad, atol=1e-5, rtol=1e-4
    )
    # DDP would average parameter gradients over ranks; their sum is the whole-batch gradient
    torch.testing.assert_close(
        ranks[0]["gamma_grad"] + ranks[1]["gamma_grad"], layer.bn.weight.grad, atol=1e-4, rtol=1e-4
    )
    for r in ranks:
        torch.testing.assert_close(r["running_var"], layer.bn.running_var, atol=1e-5, rtol=1e-5)


def test_without_a_process_group_sync_is_plain_batchnorm():
    layer = make_layer()
    layer.bn.sync = True
    reference = make_layer()
    x = batch()
    torch.testing.assert_close(layer(x), reference(x))
    assert isinstance(layer.bn, FoldedBatchNorm2d)
