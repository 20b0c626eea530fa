"""embedstore.parallel: one-core work side by side, results in order, the BLAS limit restored."""

import threading
import time
from contextlib import closing

from threadpoolctl import threadpool_info

from embedstore.parallel import in_order, one_blas_thread


def _blas_threads() -> list[int]:
    """Thread counts of the process's pthreads BLAS libraries (numpy's and scipy's OpenBLAS, which the heads'
    products and PCA use); an OpenMP-threaded one (faiss's) keeps a count per thread, so it is left out."""
    return [lib["num_threads"] for lib in threadpool_info()
            if lib["user_api"] == "blas" and lib.get("threading_layer") != "openmp"]


def test_results_come_in_the_items_order_whatever_finishes_first():
    def slow_first(i):
        time.sleep(0.05 if i == 0 else 0.0)
        return i * i

    assert list(in_order(slow_first, range(6), workers=3)) == [0, 1, 4, 9, 16, 25]
    assert list(in_order(slow_first, range(6), workers=1)) == [0, 1, 4, 9, 16, 25]


def test_a_consumer_that_stops_early_leaves_no_item_started_after_it_stopped():
    started = []
    lock = threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.02)
        return i

    with closing(in_order(work, range(10), workers=2)) as results:
        for value in results:
            if value == 1:
                break
    time.sleep(0.1)
    assert sorted(started) == [0, 1, 2]  # the first two, and the one started when the first result was taken


def test_work_side_by_side_runs_on_one_blas_thread_and_the_limit_is_restored():
    before = _blas_threads()

    def work(i):
        with one_blas_thread():  # as a LightGBM head's PCA does, inside the side-by-side fits
            time.sleep(0.01 * (3 - i))  # the first in is the last out
            return _blas_threads()

    seen = list(in_order(work, range(3), workers=3))
    assert [set(s) for s in seen] == [{1}] * 3, (seen, threadpool_info())
    assert _blas_threads() == before
