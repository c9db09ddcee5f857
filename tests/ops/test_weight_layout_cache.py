"""Without autograd the convs keep each weight's ``[K, in, out]`` copy (``functional.conv._as_kio``)
while the weight is the same tensor, unchanged: every way of changing it must show in the next
result (in-place update, ``.data`` replaced, a new tensor at a reused address), and a recorded
call must still reach the weight's gradient."""
import gc

import pytest
import torch
import torch.nn.functional as F

import spconv2d as sp
from spconv2d.functional import conv as fconv
from spconv2d.testing import random_sparse

SF = sp.functional
OPS = [
    ("subm", lambda x, w: SF.subm_conv2d(x, w, None), (4, 3, 3, 3)),
    ("strided", lambda x, w: SF.conv2d(x, w, None, stride=2, padding=1), (4, 3, 3, 3)),
    ("transposed", lambda x, w: SF.conv_transpose2d(x, w, None, stride=2), (3, 4, 2, 2)),
]


@pytest.mark.parametrize("op,shape", [o[1:] for o in OPS], ids=[o[0] for o in OPS])
@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=pytest.mark.numba)])
def test_every_change_of_the_weight_shows(op, shape, backend, gen):
    x = random_sparse(2, 3, (9, 11), 0.4, generator=gen, dtype=torch.float64)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)

    def check(weight):
        """The result with ``weight`` equals the one with a fresh copy of it (never kept)."""
        with torch.no_grad(), sp.backend(backend):
            got, ref = op(x, weight).features, op(x, weight.clone()).features
        assert torch.equal(got, ref)
        return got

    first = check(w)
    assert torch.equal(check(w), first)  # (the kept copy)
    with torch.no_grad():
        w.mul_(-2.0)  # in place: a new version
    assert torch.equal(check(w), -2.0 * first)
    w.data = torch.randn(*shape, generator=gen, dtype=torch.float64)  # new storage, same object
    check(w)
    check(torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64)))
    # tensors freed and others made (their ids and addresses may be reused)
    for _ in range(3):
        check(torch.randn(*shape, generator=gen, dtype=torch.float64))
        gc.collect()


def test_recorded_calls_reach_the_weight_gradient(gen):
    x = random_sparse(2, 3, (9, 11), 0.4, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        SF.subm_conv2d(x, w, None)  # a kept copy exists
    SF.subm_conv2d(x, w, None).features.sum().backward()
    ref = w.detach().clone().requires_grad_()
    F.conv2d(x.to_dense(), ref, None, padding=1).mul(x.to_dense().ne(0).any(1, keepdim=True)).sum().backward()
    torch.testing.assert_close(w.grad, ref.grad)


def test_the_kept_copies_are_bounded_and_dropped_with_their_weight(gen):
    fconv._KIO.clear()
    x = random_sparse(1, 3, (6, 6), 0.5, generator=gen, dtype=torch.float32)
    with torch.no_grad():
        w = torch.randn(4, 3, 3, 3, generator=gen)
        SF.subm_conv2d(x, w, None)
        assert len(fconv._KIO) == 1
        del w
        gc.collect()
        assert len(fconv._KIO) == 0
        keep = [torch.randn(4, 3, 3, 3, generator=gen) for _ in range(fconv._KIO_MAX + 5)]
        for w in keep:
            SF.subm_conv2d(x, w, None)
        assert len(fconv._KIO) == fconv._KIO_MAX
