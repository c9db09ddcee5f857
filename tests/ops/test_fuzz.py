"""Fuzz test: every op against its dense oracle on random geometry, batch, density, row order,
backend (the PyTorch path's forms, the numba backend) and index strategy, in float64, forward
and backward.

CI runs a bounded number of examples (``SPCONV2D_FUZZ_EXAMPLES``, default 200, well under a
minute); ask for more with e.g. ``SPCONV2D_FUZZ_EXAMPLES=3000 python -m pytest
tests/ops/test_fuzz.py``. The search is seeded (``SPCONV2D_FUZZ_SEED``, default 0), so a run is
reproducible; on a failure hypothesis prints the falsifying example and this test's note gives
the command that replays it.
"""
import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

import spconv2d as sp
from spconv2d.geometry import conv_output_size
from spconv2d.testing import at_sites, avg_pool2d_dense, conv2d_sites, max_pool2d_dense, sites, sort_rows

HAVE_NUMBA = sp.backends.numba_available()
EXAMPLES = int(os.environ.get("SPCONV2D_FUZZ_EXAMPLES", 200))
SEED = int(os.environ.get("SPCONV2D_FUZZ_SEED", 0))
OPS = ("subm", "conv", "convT", "convT_to", "maxpool", "avgpool")
FORMS = ("pairs", "table", "im2col", "auto", "numba")
STRATEGIES = ("auto", "sort", "grid", "hash")


@st.composite
def cases(draw):
    op = draw(st.sampled_from(OPS))
    B = draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    if op == "subm":
        k = (k[0] | 1, k[1] | 1)
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    r = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if op == "avgpool":
        r = (1, 1)  # (F.avg_pool2d has no dilation)
    pmax = (k[0] // 2, k[1] // 2) if op in ("maxpool", "avgpool") else (k[0] // 2 * r[0], k[1] // 2 * r[1])
    p = (draw(st.integers(0, pmax[0])), draw(st.integers(0, pmax[1])))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]))
    return dict(op=op, B=B, shape=(H, W), k=k, s=s, p=p, r=r, density=density,
                empty=draw(st.sampled_from([None, 0])), shuffle=draw(st.booleans()),
                channels=(draw(st.integers(1, 3)), draw(st.integers(1, 3))), bias=draw(st.booleans()),
                form=draw(st.sampled_from(FORMS)), dense_fallback=draw(st.booleans()),
                strategy=draw(st.sampled_from(STRATEGIES)), data_seed=draw(st.integers(0, 2**16)))


def _input(c, g):
    B, (H, W) = c["B"], c["shape"]
    mask = torch.rand(B, H, W, generator=g) < c["density"]
    if c["empty"] is not None:
        mask[c["empty"]] = False
    coords = mask.nonzero().to(torch.int32)
    if c["shuffle"] and coords.shape[0] > 1:
        coords = coords[torch.randperm(coords.shape[0], generator=g)]
    feats = torch.randn(coords.shape[0], c["channels"][0], generator=g, dtype=torch.float64, requires_grad=True)
    return sp.SparseTensor(feats, coords, (H, W), B)


def _run(c, x, g):
    """``(sparse output, its oracle at the output sites, the leaves to differentiate)``."""
    ci, co = c["channels"]
    k, s, p, r, op = c["k"], c["s"], c["p"], c["r"], c["op"]
    f = x.features.detach().clone().requires_grad_()
    d = x.replace(f).to_dense()
    if op in ("maxpool", "avgpool"):
        y = (sp.functional.max_pool2d if op == "maxpool" else sp.functional.avg_pool2d)(x, k, s, p, r)
        xr = x.replace(f)
        dense = max_pool2d_dense(xr, k, s, p, r) if op == "maxpool" else avg_pool2d_dense(xr, k, s, p)
        return y, at_sites(dense, y.coords), [x.features], [f]
    transposed = op in ("convT", "convT_to")
    w = torch.randn(*((ci, co) if transposed else (co, ci)), *k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(co, generator=g, dtype=torch.float64, requires_grad=True) if c["bias"] else None
    leaves = [w] + ([b] if b is not None else [])
    if op == "subm":
        y = sp.functional.subm_conv2d(x, w, b, r, index=c["strategy"])
        pad = (r[0] * (k[0] // 2), r[1] * (k[1] // 2))
        ref = at_sites(F.conv2d(d, w, b, padding=pad, dilation=r), y.coords)
    elif op == "conv":
        y = sp.functional.conv2d(x, w, b, s, p, r)
        ref = at_sites(F.conv2d(d, w, b, s, p, r), y.coords)
        assert torch.equal(sort_rows(y)[0], sites(conv2d_sites(x, k, s, p, r))), "conv output sites"
    elif op == "convT":
        y = sp.functional.conv_transpose2d(x, w, b, s, p, r)
        ref = at_sites(F.conv_transpose2d(d, w, b, s, p, dilation=r), y.coords)
    else:  # onto the sites of the input that a strided conv of the same geometry came from
        low = sp.functional.conv2d(x, torch.zeros(ci, ci, *k, dtype=torch.float64), None, s, p, r)
        lf = torch.randn(low.num_active, ci, generator=g, dtype=torch.float64, requires_grad=True)
        lf2 = lf.detach().clone().requires_grad_()
        y = sp.functional.conv_transpose2d(low.replace(lf), w, b, s, p, r, output=x, index=c["strategy"])
        opad = tuple(n - ((m - 1) * sv - 2 * pv + rv * (kv - 1) + 1)
                     for n, m, sv, pv, rv, kv in zip(x.spatial_shape, low.spatial_shape, s, p, r, k))
        ref = at_sites(F.conv_transpose2d(low.replace(lf2).to_dense(), w, b, s, p, opad, dilation=r), y.coords)
        return y, ref, [lf] + leaves, [lf2] + leaves
    return y, ref, [x.features] + leaves, [f] + leaves


def _fits(c):
    """Geometries the dense oracle itself rejects are not fuzzed (the error paths have their
    own table in tests/core/test_bad_inputs.py)."""
    if c["op"] in ("conv", "maxpool", "avgpool", "convT_to"):
        return all(conv_output_size(n, kv, sv, pv, rv) >= 1
                   for n, kv, sv, pv, rv in zip(c["shape"], c["k"], c["s"], c["p"], c["r"]))
    if c["op"] == "convT":
        return all((n - 1) * sv - 2 * pv + rv * (kv - 1) + 1 >= 1
                   for n, kv, sv, pv, rv in zip(c["shape"], c["k"], c["s"], c["p"], c["r"]))
    return True


@seed(SEED)
@settings(max_examples=EXAMPLES, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_op_matches_its_dense_oracle(c):
    note(f"replay: SPCONV2D_FUZZ_SEED={SEED} SPCONV2D_FUZZ_EXAMPLES={EXAMPLES} "
         f"python -m pytest tests/ops/test_fuzz.py  (case {c})")
    if not _fits(c):
        return
    g = torch.Generator().manual_seed(c["data_seed"])
    x = _input(c, g)
    if c["form"] == "numba":
        backend = sp.backends.create_backend("numba", dense_fallback=c["dense_fallback"]) if HAVE_NUMBA else "torch"
    else:
        backend = sp.backends.create_backend("torch", gather=c["form"], dense_fallback=c["dense_fallback"])
    with sp.backend(backend):
        y, ref, leaves, ref_leaves = _run(c, x, g)
    torch.testing.assert_close(y.features, ref, rtol=1e-10, atol=1e-10)
    if ref.numel():
        grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(y.features, leaves, grad, allow_unused=True)
        exp = torch.autograd.grad(ref, ref_leaves, grad, allow_unused=True)
        for a, e in zip(got, exp):
            a = torch.zeros_like(e) if a is None else a
            e = torch.zeros_like(a) if e is None else e
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
