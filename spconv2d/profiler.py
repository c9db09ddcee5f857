"""What a sparse network executes, layer by layer: ``with sp.profile() as prof: model(x)``.

Every sparse op called inside the block appends one :class:`OpRecord` to ``prof.records``:
the op, the path it took (``sparse``: on a kernel map; ``dense``: the submanifold conv's dense
fallback, ``F.conv2d`` on the densified input), the sites in and out and their densities, the
kernel-map pairs, and two multiply-accumulate counts:

* ``executed_macs``: what this op computed: ``pairs * C_in * C_out`` on the sparse path (a
  missing neighbour costs nothing), the dense convolution's count on the dense path;
* ``dense_macs``: what the same layer costs a dense network on the full grid (``F.conv2d``:
  output positions x ``K * C_in * C_out``; ``F.conv_transpose2d``: input positions x
  ``K * C_in * C_out``); 0 for poolings.

``timing=True`` also records each op's forward wall time (``seconds``). Outside a ``profile``
block the ops pay one thread-local lookup. Records are plain data (``dataclasses.asdict``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Iterator, List, Optional, Tuple

_state = threading.local()


@dataclasses.dataclass
class OpRecord:
    op: str                     # subm_conv2d | conv2d | conv_transpose2d | max_pool2d | avg_pool2d
    path: str                   # sparse | dense
    batch_size: int
    in_shape: Tuple[int, int]   # spatial shape of the input grid
    out_shape: Tuple[int, int]
    n_in: int                   # active sites in / out
    n_out: int
    in_density: float
    out_density: float
    c_in: int
    c_out: int
    kernel_volume: int
    pairs: Optional[int]        # kernel-map pairs (None on the dense path: no map is built)
    executed_macs: int
    dense_macs: int
    seconds: Optional[float] = None


@dataclasses.dataclass
class Profile:
    """The records of one ``sp.profile()`` block, in call order."""

    timing: bool = False
    records: List[OpRecord] = dataclasses.field(default_factory=list)

    @property
    def executed_macs(self) -> int:
        return sum(r.executed_macs for r in self.records)

    @property
    def dense_macs(self) -> int:
        return sum(r.dense_macs for r in self.records)


@contextlib.contextmanager
def profile(timing: bool = False) -> Iterator[Profile]:
    """Record every sparse op called in the block (nested blocks record into the innermost)."""
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    prof = Profile(timing=timing)
    stack.append(prof)
    try:
        yield prof
    finally:
        stack.pop()


def active() -> Optional[Profile]:
    """The innermost recording profile of this thread, or None."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


class Recorder:
    """Used by the ops: ``rec = Recorder.start()`` before the work, ``rec.done(...)`` after
    (both cheap no-ops outside a profile block)."""

    __slots__ = ("prof", "t0")

    def __init__(self, prof: Optional[Profile]):
        self.prof = prof
        self.t0 = time.perf_counter() if prof is not None and prof.timing else None

    @classmethod
    def start(cls) -> "Recorder":
        return cls(active())

    def done(self, op: str, path: str, x, y, c_in: int, c_out: int, kernel_volume: int, pairs: Optional[int],
             dense_positions: int) -> None:
        """``x``/``y``: the input / output SparseTensors; ``dense_positions``: the grid positions
        a dense layer computes ``K * C_in * C_out`` MACs at."""
        if self.prof is None:
            return
        seconds = time.perf_counter() - self.t0 if self.t0 is not None else None
        is_pool = op.endswith("pool2d")
        dense = 0 if is_pool else dense_positions * kernel_volume * c_in * c_out
        if is_pool:
            executed = 0
        elif path == "sparse":
            executed = int(pairs) * c_in * c_out
        else:
            executed = dense
        self.prof.records.append(OpRecord(
            op, path, x.batch_size, x.spatial_shape, y.spatial_shape, x.num_active, y.num_active, x.density,
            y.density, c_in, c_out, kernel_volume, pairs, executed, dense, seconds))
