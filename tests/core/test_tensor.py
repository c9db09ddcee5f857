"""SparseTensor construction, validation messages, conversions."""
import pytest
import torch

import spconv2d as sp
from spconv2d.testing import random_sparse


def _coords(rows):
    return torch.tensor(rows, dtype=torch.int32)


def test_roundtrip_dense(gen):
    images = torch.randn(3, 2, 7, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 7, 5, generator=gen) < 0.4
    mask[1] = False
    x = sp.SparseTensor.from_dense(images, mask)
    assert x.num_active == int(mask.sum()) and x.batch_size == 3 and x.spatial_shape == (7, 5)
    torch.testing.assert_close(x.to_dense(), images * mask[:, None])
    # default mask: where any channel is non-zero
    y = sp.SparseTensor.from_dense(x.to_dense())
    assert y.num_active == x.num_active
    torch.testing.assert_close(y.to_dense(), x.to_dense())


def test_from_dense_is_differentiable(gen):
    images = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
    x = sp.SparseTensor.from_dense(images, torch.ones(2, 4, 4, dtype=torch.bool))
    x.to_dense().sum().backward()
    assert torch.equal(images.grad, torch.ones_like(images))


def test_shuffled_rows_keep_their_order(gen):
    x = random_sparse(2, 3, (9, 9), 0.5, generator=gen)
    d = x.to_dense()
    c = x.coords.long()
    torch.testing.assert_close(d[c[:, 0], :, c[:, 1], c[:, 2]], x.features)


@pytest.mark.parametrize("features,coords,shape,bs,exc,msg", [
    (torch.zeros(2, 3, dtype=torch.int64), _coords([[0, 0, 0], [0, 0, 1]]), (4, 4), 1, TypeError, "floating-point"),
    (torch.zeros(2), _coords([[0, 0, 0], [0, 0, 1]]), (4, 4), 1, ValueError, r"\[N, C\]"),
    (torch.zeros(2, 3), torch.zeros(2, 3), (4, 4), 1, TypeError, "integer"),
    (torch.zeros(2, 3), _coords([[0, 0], [0, 1]]), (4, 4), 1, ValueError, r"\[N, 3\]"),
    (torch.zeros(3, 3), _coords([[0, 0, 0], [0, 0, 1]]), (4, 4), 1, ValueError, "3 rows but coords has 2"),
    (torch.zeros(2, 3), _coords([[0, 0, 0], [0, 4, 1]]), (4, 4), 1, ValueError, r"row 1 = \(0, 4, 1\) has y=4"),
    (torch.zeros(2, 3), _coords([[0, 0, 0], [0, 1, -1]]), (4, 4), 1, ValueError, "row 1.*x=-1"),
    (torch.zeros(2, 3), _coords([[0, 0, 0], [2, 1, 1]]), (4, 4), 2, ValueError, "b=2 outside.*batch_size"),
    (torch.zeros(3, 3), _coords([[0, 1, 2], [0, 0, 0], [0, 1, 2]]), (4, 4), 1, ValueError, r"rows 0 and 2.*\(0, 1, 2\)"),
    ("nope", _coords([[0, 0, 0]]), (4, 4), 1, TypeError, "torch.Tensor"),
])
def test_validation_names_the_problem(features, coords, shape, bs, exc, msg):
    with pytest.raises(exc, match=msg):
        sp.SparseTensor(features, coords, shape, bs)


def test_device_mismatch_is_reported():
    meta = torch.zeros(1, 2, device="meta")
    with pytest.raises(ValueError, match="coords are on cpu but features are on meta"):
        sp.SparseTensor(meta, _coords([[0, 0, 0]]), (2, 2), 1)


def test_from_dense_validation():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        sp.SparseTensor.from_dense(torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match="bool"):
        sp.SparseTensor.from_dense(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="mask must have shape"):
        sp.SparseTensor.from_dense(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 5, dtype=torch.bool))


def test_int64_coords_are_accepted_and_stored_int32():
    x = sp.SparseTensor(torch.ones(2, 1), torch.tensor([[0, 1, 1], [0, 2, 3]]), (4, 4))
    assert x.coords.dtype == torch.int32 and x.batch_size == 1


@pytest.mark.parametrize("reduce,expect", [("sum", [4.0, 3.0]), ("mean", [2.0, 3.0]), ("max", [3.0, 3.0]),
                                           ("min", [1.0, 3.0])])
def test_coalesce_merges_duplicates(reduce, expect):
    coords = _coords([[0, 2, 2], [0, 1, 0], [0, 2, 2]])
    feats = torch.tensor([[1.0], [3.0], [3.0]])
    x = sp.SparseTensor.coalesce(feats, coords, (4, 4), reduce=reduce)
    assert x.coords.tolist() == [[0, 1, 0], [0, 2, 2]]
    assert x.features[:, 0].tolist() == [expect[1], expect[0]]
    with pytest.raises(ValueError, match="reduce"):
        sp.SparseTensor.coalesce(feats, coords, (4, 4), reduce="median")


def test_replace_shares_sites_and_maps(gen):
    x = random_sparse(2, 3, (8, 8), 0.4, generator=gen)
    y = x.replace(torch.zeros(x.num_active, 7, dtype=x.dtype))
    assert y.coordinate_manager is x.coordinate_manager and y.num_channels == 7
    assert torch.equal(y.coords, x.coords)
    with pytest.raises(ValueError, match="rows"):
        x.replace(torch.zeros(x.num_active + 1, 3))


def test_to_and_repr(gen):
    x = random_sparse(2, 3, (8, 8), 0.4, generator=gen)
    y = x.to(torch.float32)
    assert y.dtype == torch.float32 and y.coordinate_manager is x.coordinate_manager
    r = repr(y)
    assert "active=" in r and "spatial_shape=(8, 8)" in r and "float32" in r


def test_arithmetic_and_cat(gen):
    x = random_sparse(2, 3, (8, 8), 0.4, generator=gen)
    y = x.replace(x.features * 2)
    torch.testing.assert_close((x + y).features, x.features * 3)
    torch.testing.assert_close((2 * x).features, y.features)
    z = sp.cat([x, y])
    assert z.num_channels == 6
    other = random_sparse(2, 3, (8, 8), 0.4, generator=gen)
    with pytest.raises(ValueError, match="same active sites"):
        x + other
    with pytest.raises(ValueError, match="same active sites"):
        sp.cat([x, other])
    # equal coordinates from a different manager are fine
    twin = sp.SparseTensor(x.features.clone(), x.coords.clone(), x.spatial_shape, x.batch_size)
    torch.testing.assert_close((x + twin).features, 2 * x.features)
