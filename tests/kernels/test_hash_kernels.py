"""Triton coordinate hash table (spconv2d.kernels.hash) under the interpreter (or on a GPU)."""
import pytest
import torch

from spconv2d.kernels import hash as kh
from spconv2d.testing import triton_device

DEVICE = triton_device() or "cpu"
pytestmark = pytest.mark.triton


def _unique_keys(n, space, gen, dtype):
    keys = torch.randperm(space, generator=gen)[:n]
    if dtype == torch.int64:  # genuinely 64-bit keys: the high words differ too
        keys = keys * (2**33) + torch.randint(0, 2**31, (n,), generator=gen)
        keys = torch.unique(keys)[torch.randperm(n, generator=gen)]
    return keys.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_every_key_found_and_absent_keys_miss(dtype, gen):
    keys = _unique_keys(1500, 40000, gen, dtype)
    table = kh.hash_build(keys)
    assert table.key_dtype == dtype
    assert table.capacity & (table.capacity - 1) == 0
    assert table.capacity >= 2 * keys.numel()
    assert not table.has_duplicates and table.retries == 0
    rows = kh.hash_lookup(table, keys)
    assert rows.dtype == torch.int32
    assert torch.equal(rows.cpu(), torch.arange(keys.numel(), dtype=torch.int32))
    # absent keys (never inserted) and negative keys miss
    cand = torch.arange(0, 40000, 7, device=DEVICE).to(dtype)
    if dtype == torch.int64:
        cand = cand * (2**33) + 5
    absent = cand[~torch.isin(cand, keys)]
    assert absent.numel() > 1000
    assert (kh.hash_lookup(table, absent) == -1).all()
    neg = torch.tensor([-1, -2, -(2**30)], dtype=dtype, device=DEVICE)
    assert (kh.hash_lookup(table, neg) == -1).all()
    # the table holds exactly the keys
    stored = table.keys[table.keys >= 0]
    assert torch.equal(torch.sort(stored).values, torch.sort(keys).values)


def test_lookup_keeps_shape_and_converts_query_dtype(gen):
    keys = _unique_keys(300, 5000, gen, torch.int32)
    table = kh.hash_build(keys)
    q = torch.stack([keys[:100], keys[100:200]]).long()
    q[1, 7] = 2**40  # does not fit the int32 table: absent, not wrapped around
    rows = kh.hash_lookup(table, q)
    assert rows.shape == (2, 100)
    expect = torch.arange(200, dtype=torch.int32).reshape(2, 100)
    expect[1, 7] = -1
    assert torch.equal(rows.cpu(), expect)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_forced_tiny_capacity_grows_and_retries(dtype, gen):
    keys = _unique_keys(500, 20000, gen, dtype)
    table = kh.hash_build(keys, capacity=4)
    assert table.retries >= 7 and table.capacity >= 512
    assert torch.equal(kh.hash_lookup(table, keys).cpu(), torch.arange(500, dtype=torch.int32))


def test_probe_bound_overflow_grows_never_silent_miss(gen):
    # max_probes=1: any collision overflows, so the table must grow until every key sits in its
    # home slot; no key may be lost on the way.
    keys = _unique_keys(200, 10**6, gen, torch.int32)
    table = kh.hash_build(keys, max_probes=1)
    assert table.retries > 0 and table.max_probes == 1
    assert torch.equal(kh.hash_lookup(table, keys).cpu(), torch.arange(200, dtype=torch.int32))


def test_capacity_limit_raises(gen):
    keys = _unique_keys(100, 1000, gen, torch.int32)
    with pytest.raises(RuntimeError, match="capacity"):
        kh.hash_build(keys, capacity=16, max_capacity=64)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_duplicate_keys_smallest_row_wins_and_are_reported(dtype, gen):
    base = _unique_keys(400, 3000, gen, dtype)
    extra = base[torch.randint(0, 400, (150,), generator=gen).to(DEVICE)]
    keys = torch.cat([base, extra, base[:10]])
    order = torch.randperm(keys.numel(), generator=gen).to(DEVICE)
    keys = keys[order]
    n_dup = keys.numel() - torch.unique(keys).numel()
    # expected: for every key, the smallest row holding it
    rows = torch.arange(keys.numel(), device=DEVICE)
    sk, perm = torch.sort(keys.long() * keys.numel() + rows)  # by key, then row
    first = {}
    for k, r in zip((sk // keys.numel()).tolist(), perm.tolist()):
        first.setdefault(k, r)
    expect = torch.tensor([first[k] for k in keys.long().tolist()], dtype=torch.int32)
    results = []
    for _ in range(2):  # deterministic across builds
        table = kh.hash_build(keys)
        assert table.has_duplicates and table.n_duplicates == n_dup
        results.append(kh.hash_lookup(table, keys).cpu())
    assert torch.equal(results[0], expect)
    assert torch.equal(results[1], expect)


def test_empty_table():
    keys = torch.empty(0, dtype=torch.int32, device=DEVICE)
    table = kh.hash_build(keys)
    assert table.n_keys == 0 and table.capacity >= 16
    q = torch.tensor([0, 5, 123], dtype=torch.int32, device=DEVICE)
    assert (kh.hash_lookup(table, q) == -1).all()
    assert kh.hash_lookup(table, q[:0]).numel() == 0


def test_hash_capacity():
    assert kh.hash_capacity(0) == 16
    assert kh.hash_capacity(8) == 16
    assert kh.hash_capacity(9) == 32
    assert kh.hash_capacity(1000) == 2048
    assert kh.hash_capacity(1024) == 2048


@pytest.mark.cuda
def test_gpu_large_table_matches_searchsorted():
    g = torch.Generator(device="cpu").manual_seed(0)
    keys = torch.randperm(2**26, generator=g)[: 2**21].to(torch.int32).cuda()
    table = kh.hash_build(keys)
    q = torch.randint(0, 2**26, (2**22,), generator=g).to(torch.int32).cuda()
    sk, perm = torch.sort(keys)
    pos = torch.searchsorted(sk, q).clamp(max=keys.numel() - 1)
    expect = torch.where(sk[pos] == q, perm[pos].int(), -1)
    assert torch.equal(kh.hash_lookup(table, q), expect)
