"""The dense oracle (DESIGN §2) and random inputs, shared by the tests and the benchmarks.

Every reference densifies the input, runs the PyTorch dense op, and reads the result at the
output sites; the ``*_sites`` masks say which sites a sparse op must produce.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .geometry import pair
from .tensor import SparseTensor, at_sites  # noqa: F401  (re-exported)


def triton_device() -> Optional[str]:
    """Where the Triton kernels can run here: ``"cpu"`` under the interpreter
    (``TRITON_INTERPRET=1``), ``"cuda"`` compiled on a GPU, None otherwise (no triton, or
    compiled mode without CUDA)."""
    if importlib.util.find_spec("triton") is None:
        return None
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def random_sparse(
    batch_size: int = 3,
    channels: int = 4,
    spatial_shape: Tuple[int, int] = (11, 13),
    density: float = 0.3,
    *,
    empty: Sequence[int] = (),
    shuffle: bool = True,
    dtype: torch.dtype = torch.float64,
    device="cpu",
    generator: Optional[torch.Generator] = None,
    requires_grad: bool = False,
) -> SparseTensor:
    """Uniformly random active sites (none in the batch items listed in ``empty``), random
    features, rows in shuffled order unless ``shuffle=False``."""
    H, W = spatial_shape
    mask = torch.rand(batch_size, H, W, generator=generator) < density
    for b in empty:
        mask[b] = False
    coords = mask.nonzero().to(torch.int32)
    if shuffle and coords.shape[0] > 1:
        coords = coords[torch.randperm(coords.shape[0], generator=generator)]
    feats = torch.randn(coords.shape[0], channels, generator=generator, dtype=torch.float64).to(dtype)
    feats = feats.to(device).requires_grad_(requires_grad)
    return SparseTensor(feats, coords.to(device), (H, W), batch_size)


def active_mask(x: SparseTensor) -> torch.Tensor:
    """``[B, 1, H, W]`` float mask of the active sites."""
    B, (H, W) = x.batch_size, x.spatial_shape
    m = torch.zeros(B * H * W, dtype=x.dtype, device=x.device)
    m[x.coord_set.keys.long()] = 1
    return m.view(B, 1, H, W)


def sites(mask: torch.Tensor) -> torch.Tensor:
    """Raster-ordered int32 coordinates of the non-zero entries of a ``[B, 1, H, W]`` mask."""
    return mask[:, 0].nonzero().to(torch.int32)


def sort_rows(x: SparseTensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(coords, features)`` in raster order (for comparing with :func:`sites`)."""
    H, W = x.spatial_shape
    c = x.coords.long()
    order = torch.argsort((c[:, 0] * H + c[:, 1]) * W + c[:, 2])
    return x.coords[order], x.features[order]


def conv2d_sites(x: SparseTensor, kernel_size, stride=1, padding=0, dilation=1) -> torch.Tensor:
    k, s, p, r = (pair(v, n) for v, n in ((kernel_size, "k"), (stride, "s"), (padding, "p"), (dilation, "r")))
    ones = torch.ones(1, 1, *k, dtype=x.dtype, device=x.device)
    return F.conv2d(active_mask(x), ones, stride=s, padding=p, dilation=r) > 0


def conv_transpose2d_sites(x: SparseTensor, kernel_size, stride=1, padding=0, dilation=1, output_padding=0):
    k = pair(kernel_size, "k")
    ones = torch.ones(1, 1, *k, dtype=x.dtype, device=x.device)
    return F.conv_transpose2d(active_mask(x), ones, stride=stride, padding=padding, dilation=dilation,
                              output_padding=output_padding) > 0


def masked_dense(x: SparseTensor, fill: float) -> torch.Tensor:
    """``x.to_dense()`` with ``fill`` (not zero) at inactive sites."""
    return x.to_dense().masked_fill(active_mask(x) == 0, fill)


def max_pool2d_dense(x: SparseTensor, kernel_size, stride=None, padding=0, dilation=1) -> torch.Tensor:
    """Max over active inputs: inactive sites are -inf (absent), as is F.max_pool2d's padding."""
    return F.max_pool2d(masked_dense(x, float("-inf")), kernel_size, stride, padding, dilation)


def avg_pool2d_dense(x: SparseTensor, kernel_size, stride=None, padding=0) -> torch.Tensor:
    """Mean over active inputs: window sum / number of active pixels in the window."""
    total = F.avg_pool2d(x.to_dense(), kernel_size, stride, padding, divisor_override=1)
    count = F.avg_pool2d(active_mask(x), kernel_size, stride, padding, divisor_override=1)
    return total / count.clamp(min=1)


def check_against_oracle(op, dense_op, x64: SparseTensor, params64: Sequence[torch.Tensor], *, backend=None,
                         device="cpu", dtype: torch.dtype = torch.float64, rtol: float = 1e-10,
                         atol: float = 1e-10, generator: Optional[torch.Generator] = None) -> SparseTensor:
    """Run ``op(x, *params)`` under ``backend`` on ``device`` in ``dtype`` and compare it with the
    dense oracle ``dense_op(x64.to_dense(), *params64)`` (float64) read at the output's sites:
    the values, then the gradients w.r.t. the features and every parameter for one random
    output gradient (the op runs on a fresh tensor with ``x64``'s sites). Gradients are compared
    as they are in float64 (``rtol``/``atol`` times 10) and relative to their largest magnitude
    in lower precisions. Returns the sparse output (on ``device``) for checks of its sites."""
    from .backends import backend as use_backend

    feats = x64.features.detach().to(device, dtype).requires_grad_()
    x = SparseTensor(feats, x64.coords.to(device), x64.spatial_shape, x64.batch_size, stride=x64.stride)
    params = [p.detach().to(device, dtype).requires_grad_() for p in params64]
    with use_backend(backend if backend is not None else "auto"):
        y = op(x, *params)
    f64 = x64.features.detach().clone().requires_grad_()
    p64 = [p.detach().clone().requires_grad_() for p in params64]
    ref = at_sites(dense_op(x64.replace(f64).to_dense(), *p64), y.coords.cpu())
    assert y.features.dtype == dtype, f"output dtype {y.features.dtype}, expected {dtype}"
    torch.testing.assert_close(y.features.detach().double().cpu(), ref, rtol=rtol, atol=atol)
    g = torch.randn(ref.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(y.features, [feats] + params, g.to(device, dtype), allow_unused=True)
    exp = torch.autograd.grad(ref, [f64] + p64, g, allow_unused=True)
    for a, b in zip(got, exp):
        a = torch.zeros_like(b) if a is None else a.double().cpu()
        b = torch.zeros_like(a) if b is None else b
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=10 * rtol, atol=10 * atol)
        else:
            scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
            torch.testing.assert_close(a / scale, b / scale, rtol=rtol, atol=atol)
    return y
