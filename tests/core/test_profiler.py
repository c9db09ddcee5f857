"""``sp.profile``: per-op records of what a sparse network executes; MAC counts against counts
computed independently from the kernel maps and against the dense twin's analytic count."""
import torch

import spconv2d as sp
from spconv2d import maps
from spconv2d.backends.torch_backend import TorchBackend
from spconv2d.testing import random_sparse


def test_records_and_mac_counts(gen):
    x = random_sparse(2, 3, (12, 10), 0.3, generator=gen)
    net = torch.nn.Sequential(sp.nn.SubMConv2d(3, 4, 3), sp.nn.SparseConv2d(4, 6, 2, 2), sp.nn.SparseMaxPool2d(3, 1, 1)
                              ).double()
    up = sp.nn.SparseConvTranspose2d(6, 2, 2, 2).double()
    be = TorchBackend(dense_fallback=False)
    with torch.no_grad(), sp.backend(be), sp.profile(timing=True) as prof:
        y = net(x)
        z = up(y, output=x)
    assert [r.op for r in prof.records] == ["subm_conv2d", "conv2d", "max_pool2d", "conv_transpose2d"]
    assert all(r.path == "sparse" and r.seconds is not None and r.seconds >= 0 for r in prof.records)
    # independent counts: the maps' valid entries x channels
    subm = maps.subm_map(x, (3, 3), (1, 1), be).kmap
    down = maps.conv_map(x, (2, 2), (2, 2), (0, 0), (1, 1))
    assert prof.records[0].executed_macs == int((subm.nbr >= 0).sum()) * 3 * 4
    assert prof.records[1].executed_macs == int((down.kmap.nbr >= 0).sum()) * 4 * 6
    assert prof.records[3].executed_macs == int((down.kmap.nbr >= 0).sum()) * 6 * 2  # the same pairs, transposed
    assert prof.records[2].executed_macs == 0 and prof.records[2].dense_macs == 0
    # the dense twin's analytic counts: output positions x K x C_in x C_out
    assert prof.records[0].dense_macs == 2 * 12 * 10 * 9 * 3 * 4
    assert prof.records[1].dense_macs == 2 * 6 * 5 * 4 * 4 * 6
    assert prof.records[3].dense_macs == 2 * 6 * 5 * 4 * 6 * 2
    assert prof.executed_macs == sum(r.executed_macs for r in prof.records) < prof.dense_macs
    assert prof.records[0].n_in == x.num_active and prof.records[1].out_shape == (6, 5)
    assert z.num_active == x.num_active


def test_dense_fallback_is_recorded_with_dense_macs(gen):
    x = random_sparse(1, 4, (8, 8), 1.0, generator=gen)
    with torch.no_grad(), sp.backend("torch", dense_thresholds=((None, 0.5),)), sp.profile() as prof:
        sp.nn.SubMConv2d(4, 5, 3).double()(x)
    (r,) = prof.records
    assert r.path == "dense" and r.pairs is None and r.executed_macs == r.dense_macs == 64 * 9 * 4 * 5
    assert r.seconds is None  # timing off by default


def test_nothing_is_recorded_outside_a_block(gen):
    x = random_sparse(1, 2, (5, 5), 0.5, generator=gen)
    with sp.profile() as outer:
        with sp.profile() as inner:
            sp.nn.SubMConv2d(2, 2, 3).double()(x)
    sp.nn.SubMConv2d(2, 2, 3).double()(x)
    assert len(inner.records) == 1 and outer.records == []
