"""The executor child's task threads (`worker.child.TaskThreads`): as many at once as the
executor allows, never more, and nothing submitted is dropped at stop."""

from __future__ import annotations

import threading

from worker.child import TaskThreads


def test_runs_up_to_size_at_once_and_never_more() -> None:
    release = threading.Event()
    lock = threading.Lock()
    running, peak = 0, 0
    four_in = threading.Barrier(5)

    def task(i: int) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        if i < 4:
            four_in.wait(10)  # the first four must all be running together
        release.wait(10)
        with lock:
            running -= 1

    pool: TaskThreads[int] = TaskThreads(4, task, "t")
    for i in range(20):
        pool.submit(i)
    four_in.wait(10)
    release.set()
    pool.join()
    assert peak == 4
    assert len(pool._threads) == 4


def test_everything_submitted_runs_before_join_returns() -> None:
    done: list[int] = []
    pool: TaskThreads[int] = TaskThreads(3, done.append, "t")
    for i in range(500):
        pool.submit(i)
    pool.join()
    assert sorted(done) == list(range(500))


def test_one_thread_runs_tasks_in_order_and_reuses_itself() -> None:
    done: list[int] = []
    names: set[str] = set()

    def task(i: int) -> None:
        names.add(threading.current_thread().name)
        done.append(i)

    pool: TaskThreads[int] = TaskThreads(1, task, "exec-task")
    for i in range(100):
        pool.submit(i)
    pool.join()
    assert done == list(range(100))
    assert names == {"exec-task_0"}


def test_a_sequential_executor_starts_one_thread_even_when_idle_in_between() -> None:
    started = []
    pool: TaskThreads[int] = TaskThreads(8, started.append, "t")
    for i in range(50):
        pool.submit(i)
        while not pool._idle:  # until it ran and its thread waits for the next one
            threading.Event().wait(0.001)
    pool.join()
    assert len(pool._threads) == 1  # an idle thread is reused, not joined by a new one
