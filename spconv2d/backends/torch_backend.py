"""The PyTorch path: every op in plain tensor operations, on any device. The CPU default.

Options (constructor arguments of :class:`TorchBackend`; ``sp.backend("torch", **options)``)
    ``gather``: the convolution form, ``"auto"`` (by the map's fill), ``"pairs"`` or ``"table"``.
    ``dense_fallback``: run a submanifold conv as ``F.conv2d`` above a density threshold.
    ``dense_thresholds`` / ``table_thresholds``: the step functions of the channel count behind
    those two choices, ``((max_channels, value), ...)`` with the last step ``None`` = any.
    ``grid_max_keys``: the largest key space ``auto`` builds a dense grid index for.
    Every default is a measured choice (docs/ARCHITECTURE.md, "Measured choices").

Index strategies
    ``sort``: keys sorted once (a permutation kept if the rows were not in raster order),
    lookups by ``torch.searchsorted``. ``grid``: a dense int32 table over the whole key space
    (-1 = empty), lookups by one gather. ``auto`` picks ``grid`` while the key space is at most
    ``grid_max_keys``, ``sort`` beyond. (``hash`` has no PyTorch form: sorted keys serve.)

Convolution, three forms chosen per kernel map by its *fill* (pairs / (offsets x outputs)):
    ``pairs``: per-offset gather-GEMM-scatter over the map's pair lists: for each offset ``k``,
    ``out[out_idx] += features[in_idx] @ W[k]`` (``index_add_``; within one offset every
    output row appears at most once). Only pairs that exist are computed, so the work scales
    with the number of active neighbours, not with ``K * N``: the form for sparse maps.
    ``table``: per offset, gather every output's neighbour row from the neighbour table (a zero
    row stands in for a missing neighbour) and accumulate ``out += rows @ W[k]`` in place
    (``addmm_``): ``K * N`` rows instead of the pairs, but no scatter, which is the expensive
    step on a CPU. Under ``auto`` it is superseded by ``im2col`` (as fast or faster at every
    fill measured), so ``table_thresholds`` defaults to never; it stays as an explicit form.
    ``im2col``: for chunks of output rows (``im2col_chunk_bytes`` of gathered rows), gather
    every output's ``K`` neighbour rows into ``cols [rows, K * C_in]`` (zero rows where missing)
    and compute ``cols @ W.reshape(K * C_in, C_out)``: one GEMM with a long inner dimension per
    chunk instead of ``K`` skinny ones and no accumulator passes; the form for the best-filled
    maps, above the ``im2col_thresholds`` fill. The ``gather`` option forces one form.
    In both, the identity offset of a submanifold map (the centre) is a plain GEMM with the
    bias fused (``addmm``). fp16/bf16 compute in fp32 and round once at the end.
    ``gather-after-GEMM``, whenever it applies under ``auto``: a map in which every output
    reads exactly one (offset, input) pair (:meth:`TorchBackend.single_source_rows`: a U-Net's
    k == s up-sampling to its skip's sites) is ``Y = X @ [W_0 .. W_K-1]`` in one GEMM, each
    output gathering its row of ``Y``: no per-offset passes, no scatter.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .base import Backend, affine_neighbor_keys

# Defaults of the options (docs/ARCHITECTURE.md, "Measured choices", says where each comes from).
TORCH_GRID_MAX_KEYS = 1 << 26  # 256 MiB of int32: the largest dense grid index ``auto`` builds
DENSE_SUBM_THRESHOLDS = ((None, 0.8),)  # (max channels, density)
TABLE_FILL_THRESHOLDS = ((None, 2.0),)  # (max channels, fill): never under auto (im2col wins above)
IM2COL_FILL_THRESHOLDS = ((16, 0.3), (32, 0.35), (None, 0.65))  # (max channels, fill)
IM2COL_CHUNK_BYTES = 1 << 21  # the im2col buffer of one chunk of output rows (L2-sized)
GATHER_FORMS = ("auto", "pairs", "table", "im2col")

Steps = Sequence[Tuple[Optional[int], float]]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _gather_rows(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``src[idx]`` by ``F.embedding`` (docs/ARCHITECTURE.md, "Measured choices": the fastest row gather)."""
    return F.embedding(idx, src)


def _with_zero_row(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a row of zeros appended: what a neighbour table's missing entries gather."""
    return torch.cat([x, x.new_zeros(1, x.shape[1])])


class SortIndex:
    strategy = "sort"

    def __init__(self, keys: torch.Tensor):
        if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
            self.sorted_keys, perm = torch.sort(keys)
            self.perm: Optional[torch.Tensor] = perm.to(torch.int32)
        else:
            self.sorted_keys, self.perm = keys, None

    def lookup(self, query_keys: torch.Tensor) -> torch.Tensor:
        n = self.sorted_keys.numel()
        if n == 0:
            return torch.full_like(query_keys, -1, dtype=torch.int32)
        q = query_keys.to(self.sorted_keys.dtype)
        pos = torch.searchsorted(self.sorted_keys, q).clamp_(max=n - 1)
        hit = self.sorted_keys[pos] == q
        rows = pos.to(torch.int32) if self.perm is None else self.perm[pos]
        return torch.where(hit, rows, torch.full_like(rows, -1))


class GridIndex:
    strategy = "grid"

    def __init__(self, keys: torch.Tensor, key_space: int):
        self.table = torch.full((key_space,), -1, dtype=torch.int32, device=keys.device)
        self.table[keys.long()] = torch.arange(keys.numel(), dtype=torch.int32, device=keys.device)
        self._padded = {}

    def lookup(self, query_keys: torch.Tensor) -> torch.Tensor:
        rows = self.table[query_keys.clamp(min=0).long()]
        return rows.masked_fill_(query_keys < 0, -1)

    def padded(self, shape, py: int, px: int) -> torch.Tensor:
        """The table as ``[B, H + 2 py, W + 2 px]`` with a border of -1 (cached per padding):
        neighbours up to ``(py, px)`` away are then one unchecked gather."""
        t = self._padded.get((py, px))
        if t is None:
            H, W = shape
            grid = self.table.view(-1, H, W)
            t = torch.full((grid.shape[0], H + 2 * py, W + 2 * px), -1, dtype=torch.int32, device=grid.device)
            t[:, py:py + H, px:px + W] = grid
            self._padded[(py, px)] = t
        return t


def _check_steps(steps: Steps, name: str) -> Tuple[Tuple[Optional[int], float], ...]:
    steps = tuple((None if c is None else int(c), float(v)) for c, v in steps)
    if not steps or steps[-1][0] is not None:
        raise ValueError(f"{name} must be ((max_channels, value), ..., (None, value)), got {steps!r}")
    return steps


def _step_value(steps: Steps, channels: int) -> float:
    """The value of the first step whose ``max_channels`` covers ``channels``."""
    for limit, value in steps:
        if limit is None or channels <= limit:
            return value
    raise AssertionError("the last step covers any channel count")


class TorchBackend(Backend):
    """The PyTorch path (see the module docstring for the options)."""

    name = "torch"

    def __init__(self, gather: str = "auto", dense_fallback: bool = True,
                 dense_thresholds: Steps = DENSE_SUBM_THRESHOLDS, table_thresholds: Steps = TABLE_FILL_THRESHOLDS,
                 im2col_thresholds: Steps = IM2COL_FILL_THRESHOLDS, im2col_chunk_bytes: int = IM2COL_CHUNK_BYTES,
                 grid_max_keys: int = TORCH_GRID_MAX_KEYS):
        if gather not in GATHER_FORMS:
            raise ValueError(f"TorchBackend: gather must be one of {', '.join(GATHER_FORMS)}, got {gather!r}")
        self.gather = gather
        self.dense_fallback = bool(dense_fallback)
        self.dense_thresholds = _check_steps(dense_thresholds, "dense_thresholds")
        self.table_thresholds = _check_steps(table_thresholds, "table_thresholds")
        self.im2col_thresholds = _check_steps(im2col_thresholds, "im2col_thresholds")
        if int(im2col_chunk_bytes) < 1:
            raise ValueError(f"TorchBackend: im2col_chunk_bytes must be >= 1, got {im2col_chunk_bytes!r}")
        self.im2col_chunk_bytes = int(im2col_chunk_bytes)
        self.grid_max_keys = int(grid_max_keys)

    def options(self) -> Dict[str, Any]:
        return dict(gather=self.gather, dense_fallback=self.dense_fallback, dense_thresholds=self.dense_thresholds,
                    table_thresholds=self.table_thresholds, im2col_thresholds=self.im2col_thresholds,
                    im2col_chunk_bytes=self.im2col_chunk_bytes, grid_max_keys=self.grid_max_keys)

    def dense_subm_threshold(self, c_in: int, c_out: int) -> float:
        """Density above which a submanifold conv runs as ``F.conv2d`` on the dense image (then
        read at the active sites): the sparse forms lose to the dense kernels once most
        neighbours exist, sooner for few channels."""
        return _step_value(self.dense_thresholds, max(c_in, c_out))

    def prefers_dense_subm(self, density: float, c_in: int, c_out: int) -> bool:
        return self.dense_fallback and density >= self.dense_subm_threshold(c_in, c_out)

    def default_index_strategy(self, key_space: int, n_keys: Optional[int] = None) -> str:
        return "grid" if key_space <= self.grid_max_keys else "sort"

    def build_index(self, keys: torch.Tensor, key_space: int, strategy: str):
        if strategy == "grid":
            return GridIndex(keys, key_space)
        if strategy in ("sort", "hash"):  # no hash table without Triton: sorted keys serve
            return SortIndex(keys)
        raise ValueError(f"unknown index strategy {strategy!r}")

    def neighbor_table(self, index, out_coords, in_shape, scale, offsets, divisor) -> torch.Tensor:
        H, W = in_shape
        if isinstance(index, GridIndex) and tuple(scale) == (1, 1) and tuple(divisor) == (1, 1) and out_coords.shape[0]:
            lo, hi = out_coords[:, 1:].aminmax(dim=0)
            if int(lo.min()) >= 0 and int(hi[0]) < H and int(hi[1]) < W:
                return self._grid_neighbor_table(index, out_coords, in_shape, offsets)
        nbr = torch.empty((offsets.shape[0], out_coords.shape[0]), dtype=torch.int32, device=out_coords.device)
        for k, offset in enumerate(offsets.tolist()):  # one pass per offset: no [K, N] temporaries
            nbr[k] = index.lookup(affine_neighbor_keys(out_coords, in_shape, scale, offset, divisor))
        return nbr

    def full_subm_lookup(self, index) -> bool:
        """A grid index makes every offset one gather (``_grid_neighbor_table``): cheaper than
        the mirror scatter of the other half."""
        return isinstance(index, GridIndex)

    @staticmethod
    def _grid_neighbor_table(index, out_coords, in_shape, offsets) -> torch.Tensor:
        """Same-grid lookups (output sites inside the input grid, unscaled): gather every offset
        from the -1-bordered table at ``base + dy * W' + dx``, no bounds checks, one pass."""
        py, px = (int(v) for v in offsets.abs().amax(0).tolist()) if offsets.numel() else (0, 0)
        table = index.padded(in_shape, py, px)
        Hp, Wp = table.shape[1:]
        b, y, x = out_coords.long().unbind(1)
        base = (b * Hp + y + py) * Wp + x + px
        delta = offsets[:, 0].long() * Wp + offsets[:, 1].long()
        return table.view(-1)[base[None, :] + delta[:, None]]

    # -- convolution ------------------------------------------------------------------
    def form(self, kmap, c_in: int, c_out: int, n_dst: int) -> str:
        """The form a conv on ``kmap`` runs in: the ``gather`` option, or under ``auto`` the
        densest form the map's fill pays for (im2col, then table, then pairs)."""
        if self.gather != "auto":
            return self.gather
        fill = kmap.num_pairs / max(1, kmap.kernel_volume * n_dst)
        c = max(c_in, c_out)
        if fill >= _step_value(self.im2col_thresholds, c):
            return "im2col"
        return "table" if fill >= _step_value(self.table_thresholds, c) else "pairs"

    @staticmethod
    def _im2col_index(kmap, reverse: bool) -> torch.Tensor:
        """``[N_dst, K]`` int64: every output's source row per offset (the zero row where missing)."""
        return kmap.cached("im2col@rev" if reverse else "im2col@nbr",
                           lambda: TorchBackend._table(kmap, reverse).t().contiguous())

    def _chunk_rows(self, K: int, c: int, element_size: int) -> int:
        return max(1, self.im2col_chunk_bytes // (K * c * element_size))

    def _im2col(self, src, weight, bias, kmap, reverse: bool, n_dst: int) -> torch.Tensor:
        """``dst = bias + cols @ W`` chunk by chunk: ``cols [rows, K*C_in]`` gathers every output's
        neighbour rows (zero where missing), ``W = weight.reshape(K*C_in, C_out)``: one GEMM with
        a long inner dimension per chunk instead of one skinny GEMM per offset."""
        K, c_in, c_out = weight.shape
        index, padded = self._im2col_index(kmap, reverse), _with_zero_row(src)
        w2 = weight.reshape(K * c_in, c_out)
        dst = src.new_empty(n_dst, c_out)
        rows = self._chunk_rows(K, c_in, src.element_size())
        buf = src.new_empty(min(rows, n_dst) * K, c_in)
        for a in range(0, n_dst, rows):
            b = min(a + rows, n_dst)
            idx = index[a:b].reshape(-1)
            cols = torch.index_select(padded, 0, idx, out=buf[:idx.numel()]).view(b - a, K * c_in)
            if bias is None:
                torch.mm(cols, w2, out=dst[a:b])
            else:
                torch.addmm(bias, cols, w2, out=dst[a:b])
        return dst

    @staticmethod
    def _table(kmap, reverse: bool) -> torch.Tensor:
        """``[K, N_dst]`` int64 source rows, missing neighbours -> ``N_src`` (the zero row)."""
        if reverse:
            return kmap.cached("table@rev", lambda: torch.where(kmap.rev < 0, kmap.n_out, kmap.rev).long())
        return kmap.cached("table@nbr", lambda: torch.where(kmap.nbr < 0, kmap.n_in, kmap.nbr).long())

    @staticmethod
    def single_source_rows(kmap, reverse: bool) -> Optional[torch.Tensor]:
        """For a map in which every output row has exactly one (offset, input) pair (the
        transposed k == s convolution at its skip's sites: each fine site has one parent):
        int64 ``input * K + offset`` per output row (of the reverse map if ``reverse``), else
        None. Cached on the map."""
        def build():
            table = kmap.rev if reverse else kmap.nbr
            K, n = table.shape
            valid = table >= 0
            if K == 1 or n == 0 or not bool((valid.sum(0, dtype=torch.int32) == 1).all()):
                return False
            k = torch.arange(K, device=table.device)[:, None]
            return torch.where(valid, table.long() * K + k, -1).amax(0)  # (argmax over dim 0 is slow)
        flat = kmap.cached("single_source@rev" if reverse else "single_source@nbr", build)
        return None if flat is False else flat

    @staticmethod
    def _start(src, weight, bias, n_dst, ident):
        """The accumulator: the identity offset's GEMM (+ bias) or the broadcast bias / zeros."""
        if ident is not None:
            return src @ weight[ident] if bias is None else torch.addmm(bias, src, weight[ident])
        if bias is not None:
            return bias.expand(n_dst, weight.shape[2]).clone()
        return src.new_zeros(n_dst, weight.shape[2])

    def _conv(self, src, weight, bias, kmap, reverse: bool):
        """``dst = bias + sum_k src[map_k] @ weight[k]`` in the form the map's fill prefers.
        Forward: src = features over ``kmap``; input gradient (``reverse``): src = grad_out over
        the reverse map with the weights transposed."""
        dtype = src.dtype
        cdt = _compute_dtype(dtype)
        src, weight = src.to(cdt), weight.to(cdt)
        bias = bias.to(cdt) if bias is not None else None
        n_dst = kmap.n_in if reverse else kmap.n_out
        ident = kmap.identity_offset
        flat = self.single_source_rows(kmap, reverse) if ident is None and self.gather == "auto" else None
        if flat is not None:
            # every output row reads one input row through one offset (the k == s transposed
            # conv; the k == s conv's input gradient): one GEMM gives every input row times
            # every offset's weights, one row gather picks each output's
            K, c_in, c_out = weight.shape
            y = (src @ weight.transpose(0, 1).reshape(c_in, K * c_out)).view(-1, c_out)
            dst = _gather_rows(y, flat)
            return (dst if bias is None else dst.add_(bias)).to(dtype)
        form = self.form(kmap, weight.shape[1], weight.shape[2], n_dst)
        if form == "im2col":
            return self._im2col(src, weight, bias, kmap, reverse, n_dst).to(dtype)
        dst = self._start(src, weight, bias, n_dst, ident)
        if form == "table":
            table, padded = self._table(kmap, reverse), _with_zero_row(src)
            rows = src.new_empty(n_dst, src.shape[1])  # one gather buffer for every offset
            for k in range(weight.shape[0]):
                if k != ident:
                    dst.addmm_(torch.index_select(padded, 0, table[k], out=rows), weight[k])
            return dst.to(dtype)
        ptr, in_idx, out_idx = kmap.pairs
        src_idx, dst_idx = (out_idx, in_idx) if reverse else (in_idx, out_idx)
        for k in range(weight.shape[0]):
            s, e = ptr[k], ptr[k + 1]
            if k != ident and s != e:
                dst.index_add_(0, dst_idx[s:e], _gather_rows(src, src_idx[s:e]) @ weight[k])
        return dst.to(dtype)

    def conv_forward(self, features, weight, bias, kmap) -> torch.Tensor:
        return self._conv(features, weight, bias, kmap, reverse=False)

    def conv_backward_input(self, grad_out, weight, kmap) -> torch.Tensor:
        return self._conv(grad_out, weight.transpose(1, 2), None, kmap, reverse=True)

    def conv_backward_weight(self, features, grad_out, kmap) -> torch.Tensor:
        cdt = _compute_dtype(features.dtype)
        f, g = features.to(cdt), grad_out.to(cdt)
        K = kmap.kernel_volume
        grad_w = f.new_zeros(K, f.shape[1], g.shape[1])
        ident = kmap.identity_offset
        form = self.form(kmap, f.shape[1], g.shape[1], kmap.n_out)
        if form == "im2col":
            index, padded = self._im2col_index(kmap, reverse=False), _with_zero_row(f)
            gw2 = grad_w.view(K * f.shape[1], g.shape[1])
            rows = self._chunk_rows(K, f.shape[1], f.element_size())
            for a in range(0, kmap.n_out, rows):
                b = min(a + rows, kmap.n_out)
                cols = _gather_rows(padded, index[a:b].reshape(-1)).view(b - a, K * f.shape[1])
                gw2.addmm_(cols.t(), g[a:b])
            return grad_w.to(features.dtype)
        if form == "table":
            table, padded = self._table(kmap, reverse=False), _with_zero_row(f)
            for k in range(K):
                if k == ident:
                    torch.mm(f.t(), g, out=grad_w[k])
                else:
                    torch.mm(_gather_rows(padded, table[k]).t(), g, out=grad_w[k])
            return grad_w.to(features.dtype)
        ptr, in_idx, out_idx = kmap.pairs
        for k in range(K):
            s, e = ptr[k], ptr[k + 1]
            if k == ident:
                torch.mm(f.t(), g, out=grad_w[k])
            elif s != e:
                torch.mm(_gather_rows(f, in_idx[s:e]).t(), _gather_rows(g, out_idx[s:e]), out=grad_w[k])
        return grad_w.to(features.dtype)

