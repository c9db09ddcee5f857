"""SparseSyncBatchNorm2d: two gloo processes holding different numbers of sites give the outputs,
input gradients and running statistics of one process holding them all."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spconv2d as sp
from spconv2d.testing import random_sparse


def _data():
    x = random_sparse(4, 3, (7, 9), 0.35, generator=torch.Generator().manual_seed(3))
    g = torch.randn(x.num_active, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return x, g


def _split(x, rank):
    """Rank 0 holds batch item 0, rank 1 items 1-3 (uneven site counts)."""
    keep = (x.coords[:, 0] == 0) if rank == 0 else (x.coords[:, 0] > 0)
    return keep


def _bn():
    torch.manual_seed(0)
    bn = sp.nn.SparseBatchNorm2d(3, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    return bn


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x, g = _data()
        keep = _split(x, rank)
        bn = sp.nn.SparseSyncBatchNorm2d.convert_sync_batchnorm(_bn())
        assert isinstance(bn, sp.nn.SparseSyncBatchNorm2d)
        feats = x.features[keep].clone().requires_grad_()
        local = sp.SparseTensor(feats, x.coords[keep], x.spatial_shape, x.batch_size)
        y = bn(local)
        (y.features * g[keep]).sum().backward()
        torch.save({"y": y.features.detach(), "gx": feats.grad, "gw": bn.weight.grad, "gb": bn.bias.grad,
                    "rm": bn.running_mean, "rv": bn.running_var}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x, g = _data()
    bn = _bn()
    feats = x.features.clone().requires_grad_()
    y = bn(x.replace(feats))
    (y.features * g).sum().backward()
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    for rank in range(2):
        keep = _split(x, rank)
        torch.testing.assert_close(r[rank]["y"], y.features.detach()[keep])
        torch.testing.assert_close(r[rank]["gx"], feats.grad[keep])
        torch.testing.assert_close(r[rank]["rm"], bn.running_mean)
        torch.testing.assert_close(r[rank]["rv"], bn.running_var)
    # parameter gradients: each rank holds its share; their sum is the single-process gradient
    torch.testing.assert_close(r[0]["gw"] + r[1]["gw"], bn.weight.grad)
    torch.testing.assert_close(r[0]["gb"] + r[1]["gb"], bn.bias.grad)


def test_without_a_process_group_it_is_sparse_batch_norm(gen):
    x = random_sparse(2, 3, (6, 6), 0.5, generator=gen)
    plain, sync = _bn(), sp.nn.SparseSyncBatchNorm2d.convert_sync_batchnorm(_bn())
    torch.testing.assert_close(sync(x).features, plain(x).features)
    assert set(sync.state_dict()) == set(plain.state_dict())
    net = torch.nn.Sequential(sp.nn.SubMConv2d(3, 3, 3), _bn(), sp.nn.SparseReLU())
    converted = sp.nn.SparseSyncBatchNorm2d.convert_sync_batchnorm(net)
    assert isinstance(converted[1], sp.nn.SparseSyncBatchNorm2d) and isinstance(converted[0], sp.nn.SubMConv2d)
