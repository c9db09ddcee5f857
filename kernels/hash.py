"""Coordinate hash table: open addressing, linear probing, exact packed keys.

Contract
--------
* **Keys**: packed coordinates ``key = (b * H + y) * W + x >= 0``, 1-D, int32 (``key_space <=
  2**31``) or int64 (anything larger). The table stores keys in the dtype it was built with;
  queries are converted to it (queries that do not fit, and negative queries, are absent).
* **Values**: the row number of the key in the input array (int32, so at most ``2**31 - 1``
  rows). A table maps ``keys[i] -> i``.
* **Layout**: two flat arrays of ``capacity`` slots, ``table_keys`` (key dtype, ``-1`` = empty)
  and ``table_vals`` (int32). ``capacity`` is a power of two, ``>= 2 * n`` (load factor <= 0.5)
  unless the caller forces a smaller one.
* **Hash**: ``slot = fmix32(k) & (capacity - 1)`` with murmur3's 32-bit finaliser; int64 keys
  fold their halves first (``k ^ (k >> 32)``, truncated to 32 bits).
* **Insert** (one launch, ``BLOCK`` keys per program): each key walks its probe sequence
  ``slot, slot+1, ...`` claiming the first empty slot with ``tl.atomic_cas(slot, -1, key)``; a CAS
  that returns the same key means the key is already there (a duplicate). Once placed, the row
  is written with ``tl.atomic_min`` on the value slot, so for duplicate keys **the smallest row
  wins** whatever the scheduling order (deterministic). Lanes that have finished (or are out of
  range) issue a CAS whose compare value ``-2`` never matches, because ``atomic_cas`` has no mask
  argument; compare and new value always share the key dtype exactly.
* **Probe bound**: at most ``max_probes`` slots (``min(128, capacity)`` by default). A key that
  does not find a slot within the bound is counted in a status tensor; the host then doubles the
  capacity and rebuilds from scratch. **No key is ever silently dropped**: after a successful
  build every key lies within ``max_probes`` slots of its home slot, which is exactly the
  lookup's bound.
* **Lookup** (separate launch, lock-free, read-only): walk the probe sequence until the key
  (hit), an empty slot (miss) or the bound (miss). Negative queries are absent without probing.
* **Determinism**: the table *content* (which slot holds which key) may depend on scheduling
  for colliding keys, but every lookup result (key -> smallest row) is deterministic.
* **Sync**: ``hash_build`` reads the status tensor back (one host sync per build attempt).
* **Autotune**: none; memory-bound, ``BLOCK = 256`` keys per program, 4 warps.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

EMPTY_KEY = -1
NO_ROW = 2**31 - 1  # value-slot initialiser before atomic_min
DEFAULT_MAX_PROBES = 128
_BLOCK = 256


# --------------------------------------------------------------------------------------------
# device helpers (shared with kernels/neighbors.py)
# --------------------------------------------------------------------------------------------
@triton.jit
def fmix32(h):
    """murmur3 32-bit finaliser on a uint32 tensor."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def hash_home_slot(key, capacity_mask, KEY_INT64: tl.constexpr):
    """Home slot (int32) of ``key``: ``fmix32(key) & capacity_mask``."""
    if KEY_INT64:
        k = key.to(tl.uint64, bitcast=True)
        h = (k ^ (k >> 32)).to(tl.uint32)
    else:
        h = key.to(tl.uint32, bitcast=True)
    h = fmix32(h)
    return (h & capacity_mask).to(tl.int32)


@triton.jit
def hash_probe(table_keys_ptr, table_vals_ptr, key, valid, capacity_mask, max_probes,
               KEY_INT64: tl.constexpr):
    """Row stored for ``key`` (1-D tensor), -1 where absent or ``~valid``. Lock-free, read-only."""
    slot = hash_home_slot(key, capacity_mask, KEY_INT64)
    result = (key * 0).to(tl.int32) - 1
    active = valid & (key >= 0)
    p = 0
    while (tl.max(active.to(tl.int32), axis=0) > 0) & (p < max_probes):
        cur = tl.load(table_keys_ptr + slot, mask=active, other=-1)
        found = active & (cur == key)
        val = tl.load(table_vals_ptr + slot, mask=found, other=-1)
        result = tl.where(found, val, result)
        active = active & (cur != key) & (cur != -1)
        slot = (slot + 1) & capacity_mask
        p += 1
    return result


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def hash_insert_kernel(
    keys_ptr, table_keys_ptr, table_vals_ptr, status_ptr,
    n_keys, capacity_mask, max_probes,
    KEY_INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """table[keys[i]] = min over duplicates of i; status[0] += #unplaced, status[1] += #dups."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_keys
    key = tl.load(keys_ptr + offs, mask=mask, other=0)
    empty = key * 0 - 1   # same dtype as the key, exactly (atomic_cas requirement)
    never = key * 0 - 2   # a compare value no slot ever holds: a no-op CAS for idle lanes
    slot = hash_home_slot(key, capacity_mask, KEY_INT64)
    active = mask & (key >= 0)
    placed = active & False
    dup = active & False
    p = 0
    while (tl.max(active.to(tl.int32), axis=0) > 0) & (p < max_probes):
        old = tl.atomic_cas(table_keys_ptr + slot, tl.where(active, empty, never),
                            tl.where(active, key, never))
        hit = active & ((old == empty) | (old == key))
        dup = dup | (active & (old == key))
        placed = placed | hit
        active = active & ~hit
        slot = tl.where(active, (slot + 1) & capacity_mask, slot)
        p += 1
    tl.atomic_min(table_vals_ptr + slot, offs, mask=placed)
    n_over = tl.sum(active.to(tl.int32), axis=0)
    n_dup = tl.sum(dup.to(tl.int32), axis=0)
    tl.atomic_add(status_ptr, n_over)
    tl.atomic_add(status_ptr + 1, n_dup)


@triton.jit
def hash_lookup_kernel(
    query_ptr, table_keys_ptr, table_vals_ptr, out_ptr,
    n_query, capacity_mask, max_probes,
    KEY_INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[i] = table[query[i]] or -1."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_query
    key = tl.load(query_ptr + offs, mask=mask, other=-1)
    rows = hash_probe(table_keys_ptr, table_vals_ptr, key, mask, capacity_mask, max_probes,
                      KEY_INT64)
    tl.store(out_ptr + offs, rows, mask=mask)


# --------------------------------------------------------------------------------------------
# host API
# --------------------------------------------------------------------------------------------
class HashTable(NamedTuple):
    """A built table. ``keys``/``values`` are the slot arrays (see the module contract)."""

    keys: torch.Tensor
    values: torch.Tensor
    capacity: int
    max_probes: int
    n_keys: int
    n_duplicates: int  # number of keys equal to an earlier key (0 = all unique)
    retries: int  # how many times the capacity was doubled after an overflow

    @property
    def key_dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def has_duplicates(self) -> bool:
        return self.n_duplicates > 0


def hash_capacity(n_keys: int, load_factor: float = 0.5) -> int:
    """Smallest power of two ``>= max(16, n_keys / load_factor)``."""
    need = max(16, -int(-n_keys // load_factor))
    return 1 << (int(need) - 1).bit_length()


def hash_build(
    keys: torch.Tensor,
    capacity: Optional[int] = None,
    max_probes: int = DEFAULT_MAX_PROBES,
    max_capacity: int = 2**30,
) -> HashTable:
    """Build a table mapping ``keys[i] -> i`` (keys: 1-D int32/int64, ``>= 0``).

    ``capacity`` (rounded up to a power of two) defaults to ``hash_capacity(len(keys))``. On a
    probe-bound overflow the capacity doubles and the build restarts (``retries`` counts them);
    exceeding ``max_capacity`` raises ``RuntimeError``.
    """
    if keys.dim() != 1 or keys.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"keys must be 1-D int32/int64, got {keys.dtype} {tuple(keys.shape)}")
    keys = keys.contiguous()
    n = keys.numel()
    if n >= 2**31:
        raise ValueError("hash_build supports at most 2**31 - 1 keys (int32 row numbers)")
    cap = hash_capacity(n) if capacity is None else 1 << max(int(capacity) - 1, 0).bit_length()
    key_int64 = keys.dtype == torch.int64
    retries = 0
    while True:
        if cap > max_capacity:
            raise RuntimeError(f"hash table capacity {cap} exceeds max_capacity={max_capacity}")
        probes = max(1, min(int(max_probes), cap))
        table_keys = torch.full((cap,), EMPTY_KEY, dtype=keys.dtype, device=keys.device)
        table_vals = torch.full((cap,), NO_ROW, dtype=torch.int32, device=keys.device)
        status = torch.zeros(2, dtype=torch.int32, device=keys.device)
        if n > 0:
            grid = (triton.cdiv(n, _BLOCK),)
            hash_insert_kernel[grid](
                keys, table_keys, table_vals, status,
                n, cap - 1, probes,
                KEY_INT64=key_int64, BLOCK=_BLOCK, num_warps=4,
            )
        n_over, n_dup = status.tolist()
        if n_over == 0:
            return HashTable(table_keys, table_vals, cap, probes, n, n_dup, retries)
        cap *= 2
        retries += 1


def hash_lookup(table: HashTable, query: torch.Tensor) -> torch.Tensor:
    """int32 rows for ``query`` (any shape, int32/int64), -1 where absent or negative."""
    shape = query.shape
    q = query.reshape(-1)
    if table.key_dtype == torch.int32 and q.dtype == torch.int64:
        q = torch.where((q >= 0) & (q < 2**31), q, torch.full_like(q, -1)).to(torch.int32)
    else:
        q = q.to(table.key_dtype)
    q = q.contiguous()
    out = torch.empty(q.numel(), dtype=torch.int32, device=q.device)
    if q.numel() > 0:
        grid = (triton.cdiv(q.numel(), _BLOCK),)
        hash_lookup_kernel[grid](
            q, table.keys, table.values, out,
            q.numel(), table.capacity - 1, table.max_probes,
            KEY_INT64=table.key_dtype == torch.int64, BLOCK=_BLOCK, num_warps=4,
        )
    return out.reshape(shape)


__all__ = [
    "HashTable", "hash_build", "hash_lookup", "hash_capacity", "hash_probe",
    "hash_home_slot", "fmix32", "EMPTY_KEY", "DEFAULT_MAX_PROBES", "hash_insert_kernel",
    "hash_lookup_kernel",
]
