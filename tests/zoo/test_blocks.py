"""Building blocks: the ops tables make dense / sparse twins with one state_dict layout."""
import pytest
import torch

import spconv2d.zoo as zoo


@pytest.mark.parametrize("dense,sparse", [("unet", "sparse_unet"), ("cnn", "sparse_cnn")])
def test_state_dict_exchange(dense, sparse):
    torch.manual_seed(0)
    d, s = zoo.create_model(dense), zoo.create_model(sparse)
    assert {k: v.shape for k, v in d.state_dict().items()} == {k: v.shape for k, v in s.state_dict().items()}
    s.load_state_dict(d.state_dict())          # dense -> sparse
    torch.manual_seed(1)
    d2 = zoo.create_model(dense)
    d2.load_state_dict(s.state_dict())         # sparse -> dense
    for k, v in d.state_dict().items():
        assert torch.equal(v, d2.state_dict()[k]), k


def test_ops_tables_build_the_same_kinds_of_layers():
    from spconv2d.zoo.blocks import dense_ops, sparse_ops

    d, s = dense_ops(), sparse_ops()
    assert not d.sparse and s.sparse
    for kind, args in (("conv", (3, 8, 3)), ("strided", (3, 8, 2, 2, 0)), ("up", (8, 3, 2, 2))):
        a, b = getattr(d, kind)(*args), getattr(s, kind)(*args)
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}, kind


def test_bilinear_up_is_channels_last_bilinear():
    import torch.nn.functional as F

    from spconv2d.zoo.blocks import bilinear_up

    x = torch.randn(2, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    y = bilinear_up(x, (16, 24))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.interpolate(x, size=(16, 24), mode="bilinear", align_corners=False))
