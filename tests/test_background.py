"""The worker thread behind ``nbdvma create``'s sink (nbdvma.vma.background.BackgroundWriter)."""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Iterator

import pytest

from nbdvma.vma.background import BackgroundWriter


def test_jobs_run_in_order_and_drain_waits_for_all() -> None:
    done: list[int] = []
    w = BackgroundWriter(max_bytes=1 << 20)
    for i in range(50):
        w.submit(lambda i=i: done.append(i), [], 10)
    w.drain()
    assert done == list(range(50))
    w.close()
    assert not [t for t in threading.enumerate() if t.name == w.name]


def test_bytes_in_flight_are_bounded() -> None:
    gate = threading.Event()
    w = BackgroundWriter(max_bytes=100)
    w.submit(gate.wait, [], 60)  # blocks the worker
    w.submit(lambda: None, [], 40)  # 100 in flight: still allowed
    submitted = threading.Event()

    def third() -> None:
        w.submit(lambda: None, [], 1)
        submitted.set()

    t = threading.Thread(target=third)
    t.start()
    assert not submitted.wait(0.2)  # over the bound: the caller waits
    gate.set()
    assert submitted.wait(5)
    t.join()
    w.drain()
    w.close()


def test_a_single_job_larger_than_the_bound_is_taken() -> None:
    w = BackgroundWriter(max_bytes=10)
    ran: list[bool] = []
    w.submit(lambda: ran.append(True), [], 1000)
    w.drain()
    assert ran == [True]
    w.close()


def test_first_error_is_raised_later_and_every_time() -> None:
    w = BackgroundWriter()
    ran: list[int] = []
    gate = threading.Event()

    def fail() -> None:
        gate.wait()
        raise OSError(errno.ENOSPC, "No space left on device")

    w.submit(fail, [], 1)
    w.submit(lambda: ran.append(2), [], 1)  # queued behind the failure: dropped
    gate.set()
    with pytest.raises(OSError, match="No space") as first:
        w.drain()
    assert first.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="No space"):
        w.submit(lambda: ran.append(3), [], 1)
    with pytest.raises(OSError, match="No space"):
        w.release(bytearray())
    assert ran == []
    w.close()  # does not raise


def test_release_waits_only_for_jobs_reading_that_buffer() -> None:
    mine, other = bytearray(16), bytearray(16)
    gate = threading.Event()
    w = BackgroundWriter()
    w.submit(gate.wait, [memoryview(other)[4:]], 12)
    t0 = time.monotonic()
    w.release(mine)  # no job reads from it: returns at once
    assert time.monotonic() - t0 < 1
    released = threading.Event()

    def waiter() -> None:
        w.release(other)
        released.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not released.wait(0.2)
    gate.set()
    assert released.wait(5)
    t.join()
    w.close()


def test_close_drops_queued_jobs_and_refuses_more() -> None:
    gate = threading.Event()
    ran: list[int] = []
    w = BackgroundWriter()
    w.submit(gate.wait, [], 1)
    w.submit(lambda: ran.append(1), [], 1)
    threading.Timer(0.1, gate.set).start()
    w.close()  # waits for the running job, drops the other
    assert ran == []
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(lambda: None, [], 1)
    w.close()


def test_the_thread_starts_inside_the_guard() -> None:
    # The command line passes a guard that holds Ctrl-C back while the thread starts
    # (nbdvma.interrupts.deferred): the thread is started, and recorded, inside it.
    seen: list[tuple[str, bool]] = []
    writer: BackgroundWriter

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        seen.append(("enter", writer._thread is not None))
        yield
        seen.append(("exit", writer._thread is not None))

    writer = BackgroundWriter(thread_guard=guard)
    writer.submit(lambda: None, [b"x"], 1)
    writer.submit(lambda: None, [b"y"], 1)
    writer.drain()
    writer.close()
    assert seen == [("enter", False), ("exit", True)]
