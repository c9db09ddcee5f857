"""The Triton backend glue (spconv2d.backends.triton_backend): indexes, dispatch of the kernels,
cached derived structures, options. The end-to-end oracles live in tests/ops/."""
import pytest
import torch
import torch.nn.functional as F

import spconv2d as sp
from spconv2d.backends import triton_backend
from spconv2d.backends.torch_backend import SortIndex, TorchBackend
from spconv2d.kernel_map import KernelMap
from spconv2d.testing import triton_device

DEVICE = triton_device() or "cpu"
pytestmark = pytest.mark.triton
TB = triton_backend.TritonBackend


def _keys(gen, n, space):
    return torch.randperm(space, generator=gen)[:n].to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("strategy", ["hash", "grid", "sort", "auto"])
def test_build_index_lookup(strategy, gen):
    keys = _keys(gen, 300, 4000)
    idx = TB().build_index(keys, 4000, strategy)
    assert idx.strategy in ("hash", "grid")
    q = torch.cat([keys, torch.tensor([-1, 3999], dtype=torch.int32, device=DEVICE)])
    expect = torch.cat([torch.arange(300, dtype=torch.int32),
                        torch.tensor([-1, -1 if 3999 not in keys.tolist() else
                                      keys.tolist().index(3999)], dtype=torch.int32)])
    assert torch.equal(idx.lookup(q).cpu(), expect)
    with pytest.raises(ValueError):
        TB().build_index(keys, 4000, "nope")


def test_hash_index_reports_duplicates():
    keys = torch.tensor([4, 9, 4, 1], dtype=torch.int32, device=DEVICE)
    idx = triton_backend.HashIndex(keys, 16)
    assert idx.has_duplicates
    assert idx.lookup(torch.tensor([4, 9, 1], device=DEVICE)).cpu().tolist() == [0, 1, 3]
    assert not triton_backend.HashIndex(keys[:2], 16).has_duplicates


def test_default_index_strategy_rule():
    be = TB()
    assert be.default_index_strategy(1 << 20) == "grid"
    assert be.default_index_strategy(1 << 24) == "hash"
    assert be.default_index_strategy(1 << 24, n_keys=1 << 23) == "grid"
    assert be.default_index_strategy(1 << 24, n_keys=1 << 16) == "hash"
    assert be.default_index_strategy(1 << 40, n_keys=1 << 39) == "hash"
    small = TB(grid_max_keys=1 << 10, grid_min_density=0.9)  # the limits are options
    assert small.default_index_strategy(1 << 20) == "hash"
    assert small.default_index_strategy(1 << 20, n_keys=(1 << 20) - 1) == "grid"
    with pytest.raises(ValueError, match="wgrad_splits"):
        TB(wgrad_splits=0)
    assert "allow_tf32=True" in repr(TB(allow_tf32=True))


@pytest.mark.parametrize("index_kind", ["hash", "grid", "foreign"])
def test_neighbor_table_any_index(index_kind, gen):
    B, H, W = 2, 7, 9
    m = torch.rand(B, H, W, generator=gen) < 0.5
    coords = m.nonzero().to(torch.int32)
    keys = ((coords[:, 0] * H + coords[:, 1]) * W + coords[:, 2]).to(DEVICE)
    off = torch.tensor([[dy, dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], device=DEVICE)
    be = TB()
    if index_kind == "foreign":
        idx = SortIndex(keys)
    else:
        idx = be.build_index(keys, B * H * W, index_kind)
    ref_idx = SortIndex(keys.cpu())
    expect = TorchBackend().neighbor_table(ref_idx, coords, (H, W), (1, 1), off.cpu(), (1, 1))
    got = be.neighbor_table(idx, coords.to(DEVICE), (H, W), (1, 1), off, (1, 1))
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), expect)
    # strided (scale 2) and transposed (divisor 2) geometries, the generic path included
    oc = torch.stack(torch.meshgrid(torch.arange(B), torch.arange(4), torch.arange(5),
                                    indexing="ij"), -1).reshape(-1, 3).int()
    for scale, div, c in (((2, 2), (1, 1), oc), ((1, 1), (2, 2), oc * torch.tensor([1, 3, 2]).int())):
        expect = TorchBackend().neighbor_table(ref_idx, c, (H, W), scale, off.cpu(), div)
        got = be.neighbor_table(idx, c.to(DEVICE), (H, W), scale, off, div)
        assert torch.equal(got.cpu(), expect)


def _kmap(gen, K=9, n_in=40, n_out=50):
    nbr = torch.full((K, n_out), -1, dtype=torch.int32)
    for k in range(K):
        ins, outs = torch.randperm(n_in, generator=gen)[:30], torch.randperm(n_out, generator=gen)[:30]
        nbr[k, outs] = ins.to(torch.int32)
    return KernelMap(nbr.to(DEVICE), n_in, (3, 3))


@pytest.mark.parametrize("sort_rows", [None, True, False])
def test_conv_ops_match_torch_backend_and_cache_plans(sort_rows, gen):
    kmap = _kmap(gen)
    x = torch.randn(40, 5, generator=gen).to(DEVICE)
    w = torch.randn(9, 5, 7, generator=gen).to(DEVICE)
    b = torch.randn(7, generator=gen).to(DEVICE)
    g = torch.randn(50, 7, generator=gen).to(DEVICE)
    be, ref = TB(sort_rows=sort_rows, wgrad_splits=2), TorchBackend()
    torch.testing.assert_close(be.conv_forward(x, w, b, kmap), ref.conv_forward(x, w, b, kmap))
    torch.testing.assert_close(be.conv_backward_input(g, w, kmap), ref.conv_backward_input(g, w, kmap))
    torch.testing.assert_close(be.conv_backward_weight(x, g, kmap),
                               ref.conv_backward_weight(x, g, kmap), rtol=1e-4, atol=1e-4)
    names = set(kmap.cached_names())
    assert {f"triton_tile_plan_{sort_rows}@nbr", f"triton_tile_plan_{sort_rows}@rev",
            "triton_wgrad_plan_2"} <= names
    plan = kmap.cached(f"triton_tile_plan_{sort_rows}@nbr", lambda: None)
    if sort_rows is not None:
        assert plan.sorted == sort_rows
    be.conv_forward(x, w, b, kmap)
    assert kmap.cached(f"triton_tile_plan_{sort_rows}@nbr", lambda: None) is plan  # reused, not rebuilt


def test_end_to_end_subm_against_conv2d(gen):
    B, C, H, W = 2, 3, 8, 9
    mask = torch.rand(B, H, W, generator=gen) < 0.4
    img = torch.randn(B, C, H, W, generator=gen) * mask[:, None]
    x = sp.SparseTensor.from_dense(img.to(DEVICE), mask=mask.to(DEVICE))
    conv = sp.nn.SubMConv2d(C, 5, 3).to(DEVICE)
    with sp.backend("triton"):
        y = conv(x)
    ref = F.conv2d(img, conv.weight.detach().cpu(), conv.bias.detach().cpu(), padding=1) * mask[:, None]
    torch.testing.assert_close(y.to_dense().detach().cpu(), ref, rtol=1e-4, atol=1e-4)
