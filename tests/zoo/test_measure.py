"""MAC counts: the sparse twin's executed count against one computed independently from its
sites (kernel-map pairs from the activity mask by dense convolutions), the dense twin's against
the analytic count of its architecture; per-level densities; alternating timing; stage timing."""
from collections import defaultdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spconv2d.zoo as zoo
from spconv2d.zoo.measure import (MacCounter, count_macs, instrument_stages, layer_macs, paired_ratios, spread,
                                  time_alternating)

C, K, H, W = 16, 19, 16, 32  # a small U-Net: width 16 (the default), 19 classes, 16x32 images


def _unet_dense_macs(B, c=C, k=K, h=H, w=W, in_chans=3):
    """The dense U-Net's MACs from its architecture (docstring of ``UNetBase``), written out."""
    c0, c1, c2 = c, 2 * c, 4 * c
    full, half, quarter = B * h * w, B * (h // 2) * (w // 2), B * (h // 4) * (w // 4)
    enc0 = full * 9 * (in_chans * c0 + c0 * c0)
    down1 = half * 4 * c0 * c1
    enc1 = half * 9 * (c1 * c1 * 2)
    down2 = quarter * 4 * c1 * c2
    enc2 = quarter * 9 * (c2 * c2 * 2)
    context = quarter * (9 * (c2 + 2 * in_chans + 2) * c2 + 9 * c2 * c2 + c2 * k)
    up2 = quarter * 4 * c2 * c1             # transposed: input positions x K x C_in x C_out
    dec1 = half * 9 * (2 * c1 * c1 + c1 * c1)
    up1 = half * 4 * c1 * c0
    dec0 = full * 9 * (2 * c0 * c0 + c0 * c0)
    head = full * c0 * k
    return enc0 + down1 + enc1 + down2 + enc2 + context + up2 + dec1 + up1 + dec0 + head


def _neighbours(mask, k=3):
    """Per site: how many active sites its k x k window holds (a dense conv of the mask)."""
    m = mask[:, None].double()
    return F.conv2d(m, torch.ones(1, 1, k, k, dtype=m.dtype), padding=k // 2)[:, 0]


def _sparse_unet_executed_macs(mask, c=C, k=K, in_chans=3):
    """The sparse U-Net's executed MACs from its sites alone: a submanifold 3x3 conv's pairs are
    the active neighbours of every active site; a k2 s2 down conv and the k2 s2 transposed conv
    to its skip have one pair per fine site; the dense context head counts as in ``unet``."""
    c0, c1, c2 = c, 2 * c, 4 * c
    m0 = mask
    m1 = F.max_pool2d(m0[:, None].float(), 2)[:, 0] > 0   # the 2x2 cells holding an active site
    m2 = F.max_pool2d(m1[:, None].float(), 2)[:, 0] > 0
    p = [int((_neighbours(m) * m).sum()) for m in (m0, m1, m2)]
    n = [int(m.sum()) for m in (m0, m1, m2)]
    B, h, w = mask.shape
    quarter = B * (h // 4) * (w // 4)
    context = quarter * (9 * (c2 + 2 * in_chans + 2) * c2 + 9 * c2 * c2 + c2 * k)
    return (p[0] * (in_chans * c0 + c0 * c0) + n[0] * c0 * c1 + p[1] * 2 * c1 * c1 + n[1] * c1 * c2
            + p[2] * 2 * c2 * c2 + n[1] * c2 * c1 + p[1] * (2 * c1 * c1 + c1 * c1) + n[0] * c1 * c0
            + p[0] * (2 * c0 * c0 + c0 * c0) + n[0] * c0 * k + context), (m0, m1, m2)


@pytest.fixture(scope="module")
def streets_batch():
    return zoo.build_dataset("streets", "val", num_samples=3, size=(H, W)).images


def test_dense_twin_macs_equal_the_analytic_count(streets_batch):
    model = zoo.create_model("unet", width=C).eval()
    mc = count_macs(model, streets_batch)
    assert mc.dense_layer_macs == mc.executed_macs == mc.dense_macs == _unet_dense_macs(3)
    assert mc.profile.records == []  # no sparse op in the dense twin
    s = mc.summary(images=3)
    assert s["fraction"] == 1.0 and s["dense_per_image"] == _unet_dense_macs(1)
    assert [lv["shape"] for lv in s["levels"]] == [[H, W], [H // 2, W // 2], [H // 4, W // 4]]


def test_sparse_twin_executes_its_kernel_map_pairs(streets_batch):
    model = zoo.create_model("sparse_unet", width=C, density=0.2).eval()
    mask = model.make_mask(streets_batch)
    mc = count_macs(model, streets_batch, mask)
    assert {r.path for r in mc.profile.records} == {"sparse"}
    expected, levels = _sparse_unet_executed_macs(mask)
    assert mc.executed_macs == expected
    # what the dense twin would compute on the same input: its analytic count
    assert mc.dense_macs == _unet_dense_macs(3) and mc.executed_macs < mc.dense_macs
    s = mc.summary(images=3)
    assert [lv["shape"] for lv in s["levels"]] == [[H, W], [H // 2, W // 2], [H // 4, W // 4]]
    for lv, m in zip(s["levels"], levels):
        assert lv["density"] == pytest.approx(float(m.float().mean()))
    assert s["levels"][0]["density"] == pytest.approx(0.2, abs=0.01)


def test_classifier_counts_include_linear_layers():
    x = torch.rand(2, 1, 28, 28)
    mlp = zoo.create_model("mlp").eval()
    assert count_macs(mlp, x).executed_macs == 2 * (784 * 512 + 512 * 256 + 256 * 10)
    cnn, scnn = zoo.create_model("cnn").eval(), zoo.create_model("sparse_cnn").eval()
    x[x < 0.8] = 0
    dense, sparse = count_macs(cnn, x), count_macs(scnn, x)
    assert sparse.dense_macs == dense.executed_macs > sparse.executed_macs
    assert sparse.dense_layer_macs == 2 * 128 * 10  # the fc layer runs dense in both


def test_layer_macs_of_grouped_and_transposed_layers():
    x = torch.zeros(2, 8, 5, 6)
    conv = nn.Conv2d(8, 4, 3, stride=2, padding=1, groups=2)
    assert layer_macs(conv, (x,), conv(x)) == 2 * 3 * 3 * 9 * 4 * 4
    up = nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2)
    assert layer_macs(up, (x,), up(x)) == 2 * 5 * 6 * 9 * 8 * 3
    assert layer_macs(nn.ReLU(), (x,), x) == 0


def test_time_alternating_alternates_and_summarises():
    order = []
    calls = {"a": lambda r: order.append(("a", r)), "b": lambda r: order.append(("b", r))}
    times = time_alternating(calls, rounds=3, warmup=1)
    assert order == [("a", 0), ("b", 0), ("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    s = spread([1.0, 2.0, 3.0, 4.0], scale=10)
    assert s == {"median": 25.0, "p25": 17.5, "p75": 32.5, "min": 10.0, "max": 40.0}
    assert paired_ratios([2.0, 4.0], [1.0, 2.0])["median"] == 2.0
    short = time_alternating(calls, rounds=5, warmup=0, budget_s=0.0)  # past the budget: one round
    assert {k: len(v) for k, v in short.items()} == {"a": 1, "b": 1}


def test_instrument_stages_times_each_step_once_per_forward(streets_batch):
    times = defaultdict(list)
    sparse = zoo.create_model("sparse_unet", width=C).eval()
    names = instrument_stages(sparse, times)
    with torch.no_grad():
        sparse(streets_batch)
    assert names[0] == "mask" and "refinement" in names and set(times) <= set(names)
    assert all(len(v) == 1 for v in times.values()) and {"enc0", "dense context head", "head"} <= set(times)
    dense_times = defaultdict(list)
    assert instrument_stages(zoo.create_model("unet", width=C).eval(), dense_times)[0] == "enc0"
