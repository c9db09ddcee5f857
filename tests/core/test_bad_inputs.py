"""Bad input gets a clear exception, the same one on every execution path.

One table row per kind of bad input: the call, the exception type (``TypeError`` for types and
dtypes, ``ValueError`` for values and shapes) and a pattern the message must match (it names
the argument and the problem). Rows that take a SparseTensor run at a low and at a high density:
a submanifold conv takes the dense ``F.conv2d`` path above its density threshold and the sparse
maps below, and validation must not depend on that. (The zoo's rows: tests/zoo.)
"""
import pytest
import torch

import spconv2d as sp
from spconv2d.backends.torch_backend import TorchBackend
from spconv2d.testing import random_sparse


def _c(rows, dtype=torch.int32):
    return torch.tensor(rows, dtype=dtype)


F2 = torch.zeros(2, 3)
OK_COORDS = _c([[0, 0, 0], [0, 1, 1]])

# -- SparseTensor construction (no input tensor needed) ------------------------------------------
CONSTRUCTION = [
    ("features-not-tensor", lambda: sp.SparseTensor("nope", _c([[0, 0, 0]]), (4, 4), 1), TypeError, "features must be a torch.Tensor"),
    ("features-int", lambda: sp.SparseTensor(torch.zeros(2, 3, dtype=torch.int64), OK_COORDS, (4, 4), 1), TypeError, "floating-point"),
    ("features-1d", lambda: sp.SparseTensor(torch.zeros(2), OK_COORDS, (4, 4), 1), ValueError, r"\[N, C\]"),
    ("coords-float", lambda: sp.SparseTensor(F2, torch.zeros(2, 3), (4, 4), 1), TypeError, "coords must be an integer"),
    ("coords-bool", lambda: sp.SparseTensor(F2, torch.zeros(2, 3, dtype=torch.bool), (4, 4), 1), TypeError, "coords must be an integer"),
    ("coords-shape", lambda: sp.SparseTensor(F2, _c([[0, 0], [0, 1]]), (4, 4), 1), ValueError, r"\[N, 3\]"),
    ("coords-rows", lambda: sp.SparseTensor(torch.zeros(3, 3), OK_COORDS, (4, 4), 1), ValueError, "3 rows but coords has 2"),
    ("coords-device", lambda: sp.SparseTensor(torch.zeros(2, 3, device="meta"), OK_COORDS, (4, 4), 1), ValueError, "coords are on cpu but features are on meta"),
    ("y-out-of-range", lambda: sp.SparseTensor(F2, _c([[0, 0, 0], [0, 4, 1]]), (4, 4), 1), ValueError, r"row 1 = \(0, 4, 1\) has y=4"),
    ("x-negative", lambda: sp.SparseTensor(F2, _c([[0, 0, 0], [0, 1, -1]]), (4, 4), 1), ValueError, "row 1.*x=-1"),
    ("b-out-of-range", lambda: sp.SparseTensor(F2, _c([[0, 0, 0], [2, 1, 1]]), (4, 4), 2), ValueError, "b=2 outside.*batch_size"),
    ("duplicates", lambda: sp.SparseTensor(torch.zeros(3, 3), _c([[0, 1, 2], [0, 0, 0], [0, 1, 2]]), (4, 4), 1), ValueError, r"rows 0 and 2.*\(0, 1, 2\)"),
    ("int64-coords-beyond-int32", lambda: sp.SparseTensor(F2, _c([[0, 0, 0], [0, 2**32 + 1, 0]], torch.int64), (4, 4), 1), ValueError, "y=4294967297 outside"),
    ("inferred-batch-beyond-int32", lambda: sp.SparseTensor(F2, _c([[0, 0, 0], [2**32, 1, 0]], torch.int64), (4, 4)), ValueError, "batch_size .*largest batch index.*int32"),
    ("spatial-shape-float", lambda: sp.SparseTensor(F2, OK_COORDS, (4.5, 4), 1), TypeError, "spatial_shape must be an integer"),
    ("spatial-shape-zero", lambda: sp.SparseTensor(F2, OK_COORDS, (0, 4), 1), ValueError, "spatial_shape must be >= 1"),
    ("spatial-shape-length", lambda: sp.SparseTensor(F2, OK_COORDS, (4, 4, 4), 1), ValueError, "spatial_shape must be an integer or a pair"),
    ("batch-size-float", lambda: sp.SparseTensor(F2, OK_COORDS, (4, 4), 1.0), TypeError, "batch_size must be an integer"),
    ("batch-size-zero", lambda: sp.SparseTensor(F2, OK_COORDS, (4, 4), 0), ValueError, "batch_size must be >= 1"),
    ("stride-zero", lambda: sp.SparseTensor(F2, OK_COORDS, (4, 4), 1, stride=0), ValueError, "stride must be >= 1"),
    ("from-dense-not-tensor", lambda: sp.SparseTensor.from_dense([[1.0]]), TypeError, "images must be a torch.Tensor"),
    ("from-dense-3d", lambda: sp.SparseTensor.from_dense(torch.zeros(3, 4, 4)), ValueError, r"\[B, C, H, W\]"),
    ("from-dense-int", lambda: sp.SparseTensor.from_dense(torch.zeros(1, 1, 4, 4, dtype=torch.int64)), TypeError, "floating point"),
    ("from-dense-mask-dtype", lambda: sp.SparseTensor.from_dense(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4)), TypeError, "mask must be a bool"),
    ("from-dense-mask-shape", lambda: sp.SparseTensor.from_dense(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 5, dtype=torch.bool)), ValueError, "mask must have shape"),
    ("from-dense-empty-grid", lambda: sp.SparseTensor.from_dense(torch.zeros(1, 1, 0, 4)), ValueError, "spatial_shape must be >= 1"),
    ("coalesce-reduce", lambda: sp.SparseTensor.coalesce(F2, OK_COORDS, (4, 4), reduce="median"), ValueError, "reduce"),
    ("coalesce-out-of-range", lambda: sp.SparseTensor.coalesce(F2, _c([[0, 0, 0], [0, 2**32, 0]], torch.int64), (4, 4)), ValueError, "y=4294967296 outside"),
]

# -- modules and backends, at construction -------------------------------------------------------
MODULES = [
    ("subm-even-kernel", lambda: sp.nn.SubMConv2d(3, 4, 2), ValueError, "odd"),
    ("subm-dilation-zero", lambda: sp.nn.SubMConv2d(3, 4, 3, dilation=0), ValueError, "dilation must be >= 1"),
    ("conv-kernel-zero", lambda: sp.nn.SparseConv2d(3, 4, 0), ValueError, "kernel_size must be >= 1"),
    ("conv-stride-zero", lambda: sp.nn.SparseConv2d(3, 4, 3, stride=0), ValueError, "stride must be >= 1"),
    ("conv-padding-negative", lambda: sp.nn.SparseConv2d(3, 4, 3, padding=-1), ValueError, "padding must be >= 0"),
    ("conv-channels-zero", lambda: sp.nn.SparseConv2d(0, 4, 3), ValueError, "in_channels must be >= 1"),
    ("conv-channels-float", lambda: sp.nn.SparseConv2d(3.0, 4, 3), TypeError, "in_channels must be an integer"),
    ("convT-kernel-zero", lambda: sp.nn.SparseConvTranspose2d(3, 4, 0, 2), ValueError, "kernel_size must be >= 1"),
    ("convT-output-padding", lambda: sp.nn.SparseConvTranspose2d(3, 4, 3, 2, output_padding=2), ValueError, "output_padding"),
    ("maxpool-kernel-zero", lambda: sp.nn.SparseMaxPool2d(0), ValueError, "kernel_size must be >= 1"),
    ("avgpool-padding", lambda: sp.nn.SparseAvgPool2d(3, padding=2), ValueError, "at most half the kernel"),
    ("featurewise-not-module", lambda: sp.nn.FeatureWise("relu"), TypeError, "expected an nn.Module"),
    ("backend-unknown", lambda: sp.backend("fast"), ValueError, "unknown backend 'fast'"),
    ("backend-type", lambda: sp.backend(3), TypeError, "expected a name"),
    ("backend-auto-options", lambda: sp.backend("auto", gather="table"), TypeError, "name a backend"),
    ("backend-option", lambda: TorchBackend(gather="rows"), ValueError, "gather must be one of"),
    ("index-strategy-unknown", lambda: sp.index_strategy("tree"), ValueError, "unknown index strategy 'tree'"),
]

# -- ops on an input tensor x (float64, 3 channels, 2 x 6 x 7) -----------------------------------
W33 = lambda *s, **kw: torch.randn(*s, dtype=kw.get("dtype", torch.float64))  # noqa: E731
OPS = [
    ("op-input-not-sparse", lambda x: sp.functional.subm_conv2d(x.to_dense(), W33(4, 3, 3, 3)), TypeError, "expected a SparseTensor"),
    ("op-weight-not-tensor", lambda x: sp.functional.subm_conv2d(x, [[1.0]]), TypeError, "weight must be a torch.Tensor"),
    ("op-weight-3d", lambda x: sp.functional.subm_conv2d(x, W33(4, 3, 3)), ValueError, "4-d"),
    ("op-weight-int", lambda x: sp.functional.subm_conv2d(x, torch.ones(4, 3, 3, 3, dtype=torch.int64)), TypeError, "weight must be floating point"),
    ("op-channels", lambda x: sp.functional.subm_conv2d(x, W33(4, 5, 3, 3)), ValueError, "3 channels"),
    ("op-even-kernel", lambda x: sp.functional.subm_conv2d(x, W33(4, 3, 2, 2)), ValueError, "odd"),
    ("op-dilation-zero", lambda x: sp.functional.subm_conv2d(x, W33(4, 3, 3, 3), None, 0), ValueError, "dilation must be >= 1"),
    ("op-dilation-negative", lambda x: sp.functional.subm_conv2d(x, W33(4, 3, 3, 3), None, -1), ValueError, "dilation must be >= 1"),
    ("op-dilation-float", lambda x: sp.functional.subm_conv2d(x, W33(4, 3, 3, 3), None, 1.5), TypeError, "dilation must be an integer"),
    ("op-weight-dtype", lambda x: sp.functional.subm_conv2d(x, W33(4, 3, 3, 3, dtype=torch.float32)), TypeError, "float64 but the weight is torch.float32"),
    ("op-bias-dtype", lambda x: sp.functional.subm_conv2d(x, W33(4, 3, 3, 3), torch.zeros(4)), TypeError, "float64 but the bias is torch.float32"),
    ("op-bias-shape", lambda x: sp.functional.subm_conv2d(x, W33(4, 3, 3, 3), torch.zeros(5, dtype=torch.float64)), ValueError, r"bias must have shape \(4,\)"),
    ("op-bias-not-tensor", lambda x: sp.functional.subm_conv2d(x, W33(4, 3, 3, 3), 0.5), TypeError, "bias must be None or a torch.Tensor"),
    ("op-index-unknown", lambda x: sp.functional.subm_conv2d(x, W33(4, 3, 3, 3), index="tree"), ValueError, "unknown index strategy"),
    ("op-backend-unknown", lambda x: sp.functional.subm_conv2d(x, W33(4, 3, 3, 3), backend="fast"), ValueError, "unknown backend"),
    ("op-backend-type", lambda x: sp.functional.subm_conv2d(x, W33(4, 3, 3, 3), backend=3), TypeError, "backend must be a name"),
    ("conv-stride-zero", lambda x: sp.functional.conv2d(x, W33(4, 3, 3, 3), None, 0), ValueError, "stride must be >= 1"),
    ("conv-padding-negative", lambda x: sp.functional.conv2d(x, W33(4, 3, 3, 3), None, 1, -1), ValueError, "padding must be >= 0"),
    ("conv-kernel-zero", lambda x: sp.functional.conv2d(x, W33(4, 3, 0, 3)), ValueError, "kernel sizes must be >= 1"),
    ("conv-too-small", lambda x: sp.functional.conv2d(x, W33(4, 3, 9, 9)), ValueError, "too small"),
    ("conv-stride-float", lambda x: sp.functional.conv2d(x, W33(4, 3, 3, 3), None, 1.5), TypeError, "stride must be an integer"),
    ("convT-output-padding", lambda x: sp.functional.conv_transpose2d(x, W33(3, 4, 3, 3), None, 2, 1, 1, 2), ValueError, "output_padding"),
    ("convT-output-type", lambda x: sp.functional.conv_transpose2d(x, W33(3, 4, 3, 3), None, 2, output=x.to_dense()), TypeError, "output= must be a SparseTensor"),
    ("convT-output-other-input", lambda x: sp.functional.conv_transpose2d(x, W33(3, 3, 2, 2), None, 2, output=sp.SparseTensor(x.features, x.coords, x.spatial_shape, x.batch_size)), ValueError, "same input"),
    ("convT-output-shape", lambda x: sp.functional.conv_transpose2d(x, W33(3, 3, 2, 2), None, 2, output=x), ValueError, "cannot produce"),
    ("maxpool-stride-zero", lambda x: sp.functional.max_pool2d(x, 2, 0), ValueError, "stride must be >= 1"),
    ("pool-input-not-sparse", lambda x: sp.functional.avg_pool2d(x.features, 2), TypeError, "expected a SparseTensor"),
    ("global-pool-not-sparse", lambda x: sp.functional.global_avg_pool(x.features), TypeError, "expected a SparseTensor"),
    ("bn-channels", lambda x: sp.nn.SparseBatchNorm2d(5).double()(x), ValueError, "input has 3 channels"),
    ("bn-not-sparse", lambda x: sp.nn.SparseBatchNorm2d(3).double()(x.features), TypeError, "expected a SparseTensor"),
    ("relu-not-sparse", lambda x: sp.functional.relu(x.features), TypeError, "expected a SparseTensor"),
    ("dropout-p", lambda x: sp.functional.dropout(x, 1.5), ValueError, r"p must be in \[0, 1\]"),
    ("replace-rows", lambda x: x.replace(torch.zeros(x.num_active + 1, 3, dtype=x.dtype)), ValueError, "rows"),
    ("replace-int", lambda x: x.replace(torch.zeros(x.num_active, 3, dtype=torch.int64)), TypeError, "floating-point"),
    ("cat-empty", lambda x: sp.cat([]), ValueError, "at least one tensor"),
    ("cat-not-list", lambda x: sp.cat(x), TypeError, "list or tuple"),
    ("cat-other-sites", lambda x: sp.cat([x, random_sparse(2, 3, (6, 7), 0.5)]), ValueError, "same active sites"),
    ("cat-dtypes", lambda x: sp.cat([x, x.float()]), TypeError, "one dtype"),
    ("add-other-sites", lambda x: x + random_sparse(2, 3, (6, 7), 0.5), ValueError, "same active sites"),
    ("add-string", lambda x: x + "a", TypeError, "cannot add a str"),
    ("add-tensor-shape", lambda x: x + torch.zeros(2, 3, dtype=x.dtype), ValueError, "0-d or \\[3\\]"),
    ("add-channels", lambda x: x + x.replace(torch.zeros(x.num_active, 4, dtype=x.dtype)), ValueError, "channel counts differ"),
]


@pytest.mark.parametrize("make,exc,pattern", [r[1:] for r in CONSTRUCTION + MODULES],
                         ids=[r[0] for r in CONSTRUCTION + MODULES])
def test_bad_construction_is_rejected_clearly(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


@pytest.mark.parametrize("density", [0.1, 0.95])  # below and above the dense fallback's threshold
@pytest.mark.parametrize("call,exc,pattern", [r[1:] for r in OPS], ids=[r[0] for r in OPS])
def test_bad_op_arguments_are_rejected_clearly_on_every_path(call, exc, pattern, density):
    x = random_sparse(2, 3, (6, 7), density, generator=torch.Generator().manual_seed(1))
    assert (TorchBackend().prefers_dense_subm(x.density, 3, 4)) == (density > 0.5)
    with pytest.raises(exc, match=pattern):
        call(x)


def test_the_table_is_big_enough():
    assert len(CONSTRUCTION) + len(MODULES) + len(OPS) >= 40


def test_single_site_batch_norm_has_one_behaviour_in_every_mode():
    """Fewer than two active sites where batch statistics would be used: running statistics if
    tracked, else the affine part alone; never an error (training, eval, no running stats)."""
    x = sp.SparseTensor(torch.tensor([[1.0, -2.0]], dtype=torch.float64), torch.tensor([[0, 1, 1]]), (4, 4))
    tracked = sp.nn.SparseBatchNorm2d(2).double()
    with torch.no_grad():
        tracked.running_mean.fill_(0.5), tracked.running_var.fill_(4.0), tracked.weight.fill_(2.0)
    expect = (x.features - 0.5) / (4.0 + tracked.eps) ** 0.5 * 2.0
    for mode in (True, False):
        tracked.train(mode)
        torch.testing.assert_close(tracked(x).features, expect)
    assert torch.equal(tracked.running_mean, torch.full((2,), 0.5))  # not updated by one site
    untracked = sp.nn.SparseBatchNorm2d(2, track_running_stats=False).double()
    with torch.no_grad():
        untracked.weight.fill_(3.0), untracked.bias.fill_(1.0)
    for mode in (True, False):
        untracked.train(mode)
        torch.testing.assert_close(untracked(x).features, x.features * 3.0 + 1.0)
    empty = sp.SparseTensor(torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.int32), (4, 4), 1)
    assert untracked(empty).features.shape == (0, 2)
