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


def _trained_block(ops, kind, args, co, gen):
    """A ConvBNReLU of ``kind`` whose batch norm holds non-trivial running statistics."""
    from spconv2d.zoo.blocks import conv_bn_relu

    blk = conv_bn_relu(ops, getattr(ops, kind)(*args), co)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        blk.bn.running_mean.copy_(torch.randn(co, generator=gen))
        blk.bn.running_var.copy_(torch.rand(co, generator=gen) + 0.5)
    return blk.eval()


@pytest.mark.parametrize("kind,args", [("conv", (5, 6, 3)), ("strided", (5, 6, 2, 2, 0)), ("up", (5, 6, 2, 2))])
@pytest.mark.parametrize("sparse", [False, True])
def test_conv_bn_relu_folds_the_batch_norm_at_inference(kind, args, sparse):
    import spconv2d as sp
    from spconv2d.zoo.blocks import dense_ops, sparse_ops

    gen = torch.Generator().manual_seed(3)
    blk = _trained_block(sparse_ops() if sparse else dense_ops(), kind, args, 6, gen)
    images = torch.randn(2, 5, 12, 14, generator=gen)
    x = sp.SparseTensor.from_dense(images, torch.rand(2, 12, 14, generator=gen) < 0.4) if sparse else images

    def run():
        y = blk(x)
        return y.features if sparse else y

    with torch.enable_grad():  # autograd records: conv -> BN -> ReLU as modules
        ref = run()
        assert ref.requires_grad
    with torch.no_grad():  # eval, nothing recorded: one conv with the folded weights
        got = run()
        key = blk._fold_key
        assert key is not None and torch.equal(run(), got) and blk._fold_key == key  # cached
        torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-5)
        # the cache follows in-place changes of the statistics and the parameters
        blk.bn.running_mean.add_(0.5)
        blk.conv.weight.mul_(2.0)
        got = run()
    with torch.enable_grad():
        torch.testing.assert_close(got, run().detach(), rtol=1e-5, atol=1e-5)


def test_conv_bn_relu_does_not_fold_in_training_or_without_running_stats():
    from spconv2d.zoo.blocks import ConvBNReLU

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    blk = ConvBNReLU(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    with torch.no_grad():
        blk.train()(x)  # batch statistics: no fold, the running statistics are updated
        assert blk._fold_key is None and blk.bn.num_batches_tracked == 1
    free = ConvBNReLU(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4, track_running_stats=False),
                      torch.nn.ReLU()).eval()
    with torch.no_grad():
        y = free(x)  # no running statistics: batch statistics even in eval, never folded
    assert free._fold_key is None
    torch.testing.assert_close(y, torch.relu(free.bn(free.conv(x))))


def test_conv_bn_relu_calls_its_modules_while_hooks_watch_them():
    """A forward hook on the conv (e.g. ``zoo.measure.MacCounter``) sees its call: no fold."""
    from spconv2d.zoo.blocks import dense_ops

    blk = _trained_block(dense_ops(), "conv", (3, 4, 3), 4, torch.Generator().manual_seed(5))
    seen = []
    handle = blk.conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        blk(torch.randn(1, 3, 6, 6))
    handle.remove()
    assert seen == [torch.Size([1, 4, 6, 6])] and blk._fold_key is None
