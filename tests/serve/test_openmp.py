"""train.serve.openmp: a thread's idle OpenMP workers are handed back, and its next
parallel op builds them again."""

import ctypes
import itertools
import threading
import time
from pathlib import Path

import pytest
import torch

from train.serve.openmp import _libgomp, release_workers, releasing

pytestmark = pytest.mark.skipif(
    _libgomp() is None or torch.get_num_threads() < 2,
    reason="needs libgomp (torch's Linux wheels) and 2+ threads",
)


_NAMES = itertools.count()
_name = threading.local()  # each test thread's own name: an ended one's workers may linger


def _threads() -> int:
    # The OS threads named as the test's thread: itself and the OpenMP workers it started
    # (a new thread takes its creator's name), whatever other tests' threads do meanwhile.
    tasks = Path("/proc/self/task")
    return sum(_named(t, _name.value) for t in tasks.iterdir())


def _named(task: Path, name: bytes) -> bool:
    try:
        return (task / "comm").read_bytes().strip() == name
    except FileNotFoundError:  # it ended while we looked
        return False


def _settled(want: int) -> int:
    # Released workers end on their own, a moment after the release returns.
    deadline = time.monotonic() + 5
    while (n := _threads()) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def _parallel_op() -> torch.Tensor:
    return torch.ones(2000, 2000).sum(dim=1)  # big enough that torch runs it in parallel


def _in_thread(fn):
    out = {}

    def run():
        _name.value = f"fmm-omp-{next(_NAMES)}".encode()
        ctypes.CDLL(None).prctl(15, _name.value, 0, 0, 0)  # PR_SET_NAME, for _threads
        out["value"] = fn()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["value"]


def test_release_frees_the_calling_threads_workers_and_they_come_back():
    def counts():
        before = _threads()
        first = _parallel_op()
        with_team = _threads()
        released = release_workers()
        after = _settled(before)
        again = _parallel_op()  # builds its team anew, same result
        return before, with_team, released, after, _threads(), torch.equal(first, again)

    before, with_team, released, after, rebuilt, same = _in_thread(counts)
    assert with_team > before  # the thread's op started OpenMP workers
    assert released
    assert after == before  # ... which left with the release
    assert rebuilt == with_team and same


def test_releasing_hands_back_after_the_call_and_after_a_raise():
    def work(x):
        _parallel_op()
        return x + 1

    def counts():
        before = _threads()
        value = releasing(work)(1)
        return before, value, _settled(before)

    before, value, after = _in_thread(counts)
    assert value == 2 and after == before

    def fails():
        _parallel_op()
        raise ValueError("model failed")

    def counts_raising():
        before = _threads()
        with pytest.raises(ValueError, match="model failed"):
            releasing(fails)()
        return before, _settled(before)

    before, after = _in_thread(counts_raising)
    assert after == before
