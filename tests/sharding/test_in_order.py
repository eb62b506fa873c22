"""``job.in_order``: results in input order, bounded look-ahead, and a slow item at the head does not
hold back the items behind it (several trickling hosts in one chunk cost one deadline, not one each)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from flora.sharding.build.job import in_order

WAIT_S = 10  # a bound for a broken implementation, never reached when it works


def test_results_come_in_input_order_and_errors_in_place():
    def fn(i):
        if i == 7:
            raise ValueError("seven")
        return i * i

    with ThreadPoolExecutor(4) as pool:
        got = in_order(pool, fn, iter(range(7)), window=3)
        assert [(i, r) for i, r in got] == [(i, i * i) for i in range(7)]
        with pytest.raises(ValueError, match="seven"):
            list(in_order(pool, fn, iter(range(10)), window=3))


def test_a_slow_head_does_not_hold_back_the_items_behind_it():
    head_may_finish = threading.Event()
    last_done = threading.Event()
    started = []

    def fn(i):
        started.append(i)
        if i == 0:  # the trickling host: finishes only once every other item has
            assert head_may_finish.wait(WAIT_S)
        if i == 19:
            last_done.set()
        return i

    with ThreadPoolExecutor(2) as pool:
        results = in_order(pool, fn, iter(range(20)), window=4, hold=32)
        waiter = threading.Thread(target=lambda: (last_done.wait(WAIT_S), head_may_finish.set()))
        waiter.start()
        assert [i for i, _ in results] == list(range(20))
        waiter.join()
    assert last_done.is_set()  # item 19 finished while item 0 was still running


def test_the_look_ahead_is_bounded_by_hold():
    head_may_finish = threading.Event()
    started = []
    lock = threading.Lock()

    def fn(i):
        with lock:
            started.append(i)
            if len(started) == 6:  # the hold is full: nothing more may start until the head is consumed
                threading.Timer(0.2, head_may_finish.set).start()
        if i == 0:
            assert head_may_finish.wait(WAIT_S)
        return i

    with ThreadPoolExecutor(2) as pool:
        results = in_order(pool, fn, iter(range(50)), window=2, hold=6)
        first = next(results)
        assert first == (0, 0) and len(started) == 6  # while the head ran, exactly `hold` were started
        assert [i for i, _ in results] == list(range(1, 50))
