"""``KernelMap``: which input row feeds which output row through which kernel offset.

``nbr[K, N_out]`` (int32, -1 = missing, offset-major so one offset's entries are contiguous)
is the primary form. Everything else is derived lazily from it and cached on the map, so a
map built once per batch serves every layer that shares it, forward and backward:

* ``rev``   ``[K, N_in]``: the reverse table, ``rev[k, i] = j  <=>  nbr[k, j] = i``. Every
  convolution here maps an (offset, input) pair to at most one output, so it is well defined.
* ``pairs`` the per-offset pair lists in CSR form (:func:`pair_lists`): ``ptr[K+1]`` (a Python
  list), ``in_idx``, ``out_idx`` (int64), pairs of offset ``k`` at ``ptr[k]:ptr[k+1]``,
  ``out_idx`` ascending; ``num_pairs`` their count.
* ``cached(name, fn)`` for backend-specific derivations (tile masks, sorted orders, ...).
  Derivations of one direction are named ``"<name>@nbr"`` / ``"<name>@rev"``: ``transpose()``
  hands them to the transposed map with the direction swapped.

A submanifold map is *symmetric*: ``nbr[k, j] = i  <=>  nbr[K-1-k, i] = j``, so its reverse
table is ``nbr.flip(0)``. ``transpose()`` gives the map of the transposed convolution with the
same geometry (inputs and outputs swapped), sharing the tables.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch


def pair_lists(nbr: torch.Tensor) -> Tuple[List[int], torch.Tensor, torch.Tensor]:
    """The per-offset pair lists of a table ``nbr [K, N_out]`` in CSR form:
    ``(ptr [K+1] list, in_idx int64, out_idx int64)``, offset ``k``'s pairs at
    ``ptr[k]:ptr[k+1]`` with ``out_idx`` ascending (``nbr[k, out_idx[p]] = in_idx[p]``)."""
    valid = nbr >= 0
    k, out_idx = valid.nonzero(as_tuple=True)  # row-major: grouped by k, j ascending
    in_idx = nbr[k, out_idx].long()
    ptr = [0] + torch.cumsum(valid.sum(1), 0).tolist()
    return ptr, in_idx, out_idx


class KernelMap:
    __slots__ = ("nbr", "n_in", "kernel_size", "symmetric", "identity_offset", "_cache")

    def __init__(
        self,
        nbr: torch.Tensor,
        n_in: int,
        kernel_size: Tuple[int, int],
        symmetric: bool = False,
        identity_offset: Optional[int] = None,
        rev: Optional[torch.Tensor] = None,
    ):
        if nbr.dtype != torch.int32 or nbr.dim() != 2:
            raise TypeError(f"nbr must be int32 [K, N_out], got {nbr.dtype} {tuple(nbr.shape)}")
        self.nbr = nbr
        self.n_in = int(n_in)
        self.kernel_size = (int(kernel_size[0]), int(kernel_size[1]))
        self.symmetric = symmetric
        # Offset whose pairs are exactly (i, i) for every row (the centre of a submanifold
        # map): backends may replace its gather/scatter by a plain GEMM.
        self.identity_offset = identity_offset
        self._cache: Dict[str, object] = {}
        if rev is not None:
            self._cache["rev"] = rev

    @property
    def kernel_volume(self) -> int:
        return self.nbr.shape[0]

    @property
    def n_out(self) -> int:
        return self.nbr.shape[1]

    @property
    def device(self) -> torch.device:
        return self.nbr.device

    def cached(self, name: str, fn: Callable[[], object]):
        """Derived structure ``name``, computed by ``fn()`` on first use."""
        value = self._cache.get(name)
        if value is None:
            value = fn()
            self._cache[name] = value
        return value

    def cached_names(self) -> List[str]:
        """Names of the derived structures built so far."""
        return list(self._cache)

    @property
    def rev(self) -> torch.Tensor:
        return self.cached("rev", self._build_rev)

    def _build_rev(self) -> torch.Tensor:
        if self.symmetric:
            return self.nbr.flip(0).contiguous()
        K, n_out = self.nbr.shape
        rev = torch.full((K, self.n_in), -1, dtype=torch.int32, device=self.device)
        k, j = (self.nbr >= 0).nonzero(as_tuple=True)
        rev[k, self.nbr[k, j].long()] = j.to(torch.int32)
        return rev

    @property
    def pairs(self) -> Tuple[List[int], torch.Tensor, torch.Tensor]:
        return self.cached("pairs", lambda: pair_lists(self.nbr))

    @property
    def num_pairs(self) -> int:
        """How many (offset, input, output) pairs the map holds."""
        if "pairs" in self._cache:
            return self._cache["pairs"][0][-1]
        return self.cached("num_pairs", lambda: int((self.nbr >= 0).sum()))

    def transpose(self, rev: Optional[torch.Tensor] = None) -> "KernelMap":
        """The map of the transposed op: outputs become inputs; tables are shared. ``rev``: this
        map's reverse table when the caller built it (``Backend.reverse_table``)."""
        t = KernelMap(
            self.rev if rev is None else rev, self.n_out, self.kernel_size, self.symmetric,
            self.identity_offset, rev=self.nbr,
        )
        for name, value in self._cache.items():  # "X@nbr" of one map is "X@rev" of the other
            base, _, side = name.rpartition("@")
            if side in ("nbr", "rev") and base:
                t._cache.setdefault(f"{base}@{'rev' if side == 'nbr' else 'nbr'}", value)
        return t

    def __repr__(self) -> str:
        return (
            f"KernelMap(K={self.kernel_volume}, n_in={self.n_in}, n_out={self.n_out}, "
            f"kernel_size={self.kernel_size}, symmetric={self.symmetric})"
        )
