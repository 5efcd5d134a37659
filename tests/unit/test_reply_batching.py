"""How the executor child groups finished tasks into one reply (`worker.child.collect`)."""

from __future__ import annotations

import queue
import threading

from worker.child import collect


def _queue(*items: int | None) -> queue.SimpleQueue[int | None]:
    q: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    for item in items:
        q.put(item)
    return q


def test_idle_executor_replies_with_what_is_ready_and_does_not_wait() -> None:
    q = _queue(2, 3)
    handled: list[int] = []
    late = threading.Timer(0.05, q.put, args=(4,))
    late.start()
    # A ten-minute linger would hang the test if an idle executor waited for more.
    out, ended = collect(q, 1, lambda i: handled.append(i) or i * 10, lambda: False, linger_sec=600)
    late.join()
    assert out == [10, 20, 30]
    assert handled == [1, 2, 3]
    assert not ended
    assert q.get_nowait() == 4  # left for the next reply


def test_busy_executor_waits_for_the_next_result_up_to_the_batch_size() -> None:
    q = _queue()
    threading.Timer(0.05, q.put, args=(2,)).start()
    threading.Timer(0.10, q.put, args=(3,)).start()
    out, ended = collect(q, 1, lambda i: i, lambda: True, batch=3, linger_sec=600)
    assert out == [1, 2, 3]  # waited for both, then stopped at the batch size
    assert not ended


def test_busy_executor_stops_waiting_once_the_backlog_is_gone() -> None:
    q = _queue()
    backlog = threading.Event()
    backlog.set()

    def last_result() -> None:
        backlog.clear()  # the task in flight was the last one
        q.put(2)

    threading.Timer(0.05, last_result).start()
    out, _ = collect(q, 1, lambda i: i, backlog.is_set, batch=32, linger_sec=600)
    assert out == [1, 2]


def test_linger_is_bounded_when_nothing_more_finishes() -> None:
    q = _queue()
    out, ended = collect(q, 1, lambda i: i, lambda: True, linger_sec=0.01)
    assert (out, ended) == ([1], False)


def test_end_marker_stops_after_the_results_before_it() -> None:
    q = _queue(2, None, 3)
    out, ended = collect(q, 1, lambda i: i, lambda: True, linger_sec=600)
    assert (out, ended) == ([1, 2], True)
    assert q.get_nowait() == 3


def test_a_reply_never_exceeds_the_batch_size_even_when_more_is_ready() -> None:
    q = _queue(*range(2, 11))
    out, _ = collect(q, 1, lambda i: i, lambda: False, batch=4)
    assert out == [1, 2, 3, 4]
