"""Several pieces of one-core work at once (a LightGBM fit at ``n_jobs=1``), on threads, results in order.

Threads, not processes: LightGBM's training and prediction and numpy's products release the GIL, and threads
read the probe's one feature frame where worker processes would each need a copy of it. Each piece is computed
exactly as it would be alone, so results do not depend on how many run at once.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from threadpoolctl import threadpool_limits

T = TypeVar("T")
R = TypeVar("R")

_blas_lock = threading.Lock()
_blas_holders = 0
_blas_limits = None


_budget: int | None = None  # cores this process shares with others (core_budget), or None: all it may run on


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS tells it, not the machine's count), or
    fewer inside :func:`core_budget`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, _budget) if _budget else cores


@contextmanager
def core_budget(cores: int):
    """Within the block, :func:`usable_cores` is at most ``cores``: several processes (tuning workers) share the
    machine, and each runs its side-by-side fits on its share."""
    global _budget
    before, _budget = _budget, cores
    try:
        yield
    finally:
        _budget = before


def in_order(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn(item)`` for every item, at most ``workers`` at a time, yielded in the items' order.

    The next item starts when the consumer comes back for another result, so a consumer that stops early (a
    pruned trial) leaves at most ``workers - 1`` items computed for nothing, and none started after it
    stopped; close the iterator (``contextlib.closing``, or take it whole with ``list``) so that its threads
    and its hold of the BLAS end with it. While several run, the BLAS is held to one thread each, so the
    pieces do not fight over the cores.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    todo = iter(items)
    with one_blas_thread(), ThreadPoolExecutor(min(workers, len(items))) as pool:
        running = deque(pool.submit(fn, item) for _, item in zip(range(workers), todo))
        try:
            while running:
                yield running.popleft().result()
                for item in todo:  # the next one starts only once the consumer asks for more
                    running.append(pool.submit(fn, item))
                    break
        finally:
            for future in running:
                future.cancel()


@contextmanager
def one_blas_thread():
    """Hold the BLAS (numpy's, process-wide) to one thread while any thread is inside this block.

    threadpoolctl's limits are process-wide and not safe to nest from several threads (the last to leave
    could restore another's limit), so the holders are counted here: the first in sets the limit, the last
    out restores it. OpenBLAS takes a thread count set from the main thread only (measured: one set from a
    worker thread is ignored once the main thread has set one), so work run by :func:`in_order`, which holds
    the limit from the consumer's thread, is where a holder inside a worker thread counts.
    """
    global _blas_holders, _blas_limits
    with _blas_lock:
        if not _blas_holders:
            _blas_limits = threadpool_limits(limits=1, user_api="blas")
        _blas_holders += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_holders -= 1
            if not _blas_holders:
                _blas_limits.restore_original_limits()

