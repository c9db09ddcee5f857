"""MNIST classifiers: mlp, cnn, sparse_cnn."""
import torch

import spconv2d.zoo as zoo


def test_sparse_cnn_ignores_background_when_mask_is_nonzero(input_for):
    torch.manual_seed(0)
    m = zoo.create_model("sparse_cnn").eval()
    x, _ = input_for("sparse_cnn")
    with torch.no_grad():
        a = m(x)
        b = m(x, (x != 0).any(1))  # explicit mask = the default (non-zero pixels)
    torch.testing.assert_close(a, b)


def test_sparse_cnn_handles_an_image_without_active_pixels():
    torch.manual_seed(0)
    x = torch.zeros(2, 1, 28, 28)
    x[1, 0, 10:15, 10:12] = 1.0
    m = zoo.create_model("sparse_cnn")
    out = m(x)
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_mlp_takes_a_square_side_or_a_height_and_width():
    a, b = zoo.create_model("mlp"), zoo.create_model("mlp", img_size=(28, 28))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    wide = zoo.create_model("mlp", img_size=(14, 28))
    assert wide(torch.rand(2, 1, 14, 28)).shape == (2, 10)


def test_sparse_cnn_computes_on_its_own_mask_policy():
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    m = zoo.create_model("sparse_cnn", mask_policy="edge", density=0.2).eval()
    mask = m.make_mask(x)
    assert abs(float(mask.float().mean()) - 0.2) < 0.01
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x, mask))
