"""Property test: random shapes, densities, kernels, strides and dilations against the oracle."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import spconv2d as sp
from spconv2d.testing import at_sites, conv2d_sites, sites, sort_rows


@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    r = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    p = (draw(st.integers(0, k[0] // 2 * r[0])), draw(st.integers(0, k[1] // 2 * r[1])))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**16))
    return B, (H, W), k, s, p, r, density, seed


@settings(max_examples=60, deadline=None)
@given(cases())
def test_conv_family_matches_dense(case):
    B, (H, W), k, s, p, r, density, seed = case
    g = torch.Generator().manual_seed(seed)
    Ho = (H + 2 * p[0] - r[0] * (k[0] - 1) - 1) // s[0] + 1
    Wo = (W + 2 * p[1] - r[1] * (k[1] - 1) - 1) // s[1] + 1
    mask = torch.rand(B, H, W, generator=g) < density
    coords = mask.nonzero().int()
    coords = coords[torch.randperm(coords.shape[0], generator=g)]
    feats = torch.randn(coords.shape[0], 2, generator=g, dtype=torch.float64, requires_grad=True)
    x = sp.SparseTensor(feats, coords, (H, W), B)
    w = torch.randn(3, 2, *k, generator=g, dtype=torch.float64)
    if Ho < 1 or Wo < 1:
        try:
            sp.functional.conv2d(x, w, None, s, p, r)
        except ValueError as e:
            assert "too small" in str(e)
            return
        raise AssertionError("an empty output grid must be rejected")
    y = sp.functional.conv2d(x, w, None, s, p, r)
    coords_y, _ = sort_rows(y)
    assert torch.equal(coords_y, sites(conv2d_sites(x, k, s, p, r)))
    dense = F.conv2d(x.to_dense(), w, None, s, p, r)
    torch.testing.assert_close(y.features, at_sites(dense, y.coords), rtol=1e-10, atol=1e-10)
    # submanifold with odd kernels
    ko = (k[0] | 1, k[1] | 1)
    wo = torch.randn(3, 2, *ko, generator=g, dtype=torch.float64)
    z = sp.functional.subm_conv2d(x, wo, None, r)
    dz = F.conv2d(x.to_dense(), wo, None, 1, (r[0] * (ko[0] // 2), r[1] * (ko[1] // 2)), r)
    torch.testing.assert_close(z.features, at_sites(dz, x.coords), rtol=1e-10, atol=1e-10)
    # the transposed conv back onto x's sites equals the dense transposed conv there
    if y.num_active:
        wt = torch.randn(3, 2, *k, generator=g, dtype=torch.float64)
        u = sp.functional.conv_transpose2d(y, wt, None, s, p, r, output=x)
        opad = tuple(n - ((m - 1) * sv - 2 * pv + rv * (kv - 1) + 1)
                     for n, m, sv, pv, rv, kv in zip((H, W), y.spatial_shape, s, p, r, k))
        du = F.conv_transpose2d(y.to_dense(), wt, None, s, p, opad, dilation=r)
        torch.testing.assert_close(u.features, at_sites(du, x.coords), rtol=1e-10, atol=1e-10)
