"""kube.PriorityPool: the most urgent waiting API call goes first, then the oldest; a limited priority
(status writes) never has more calls in flight than its slots, while others use every worker; results
and errors reach the awaiting coroutine. Real threads and a real event loop, no API server needed."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from lora_operator.kube import READ, STATUS, URGENT, PriorityPool


def test_waiting_calls_run_most_urgent_first_then_oldest() -> None:
    ran: list[str] = []
    gate = threading.Event()

    async def main() -> None:
        pool = PriorityPool(workers=1)
        try:
            # The one worker is held, so every later call waits in the queue.
            blocker = asyncio.ensure_future(pool.run(READ, lambda: gate.wait(30)))
            await asyncio.sleep(0.05)
            order = [("status-1", STATUS), ("read-1", READ), ("pod-1", URGENT), ("status-2", STATUS),
                     ("pod-2", URGENT)]
            calls = [asyncio.ensure_future(pool.run(p, lambda n=n: ran.append(n) or n)) for n, p in order]
            await asyncio.sleep(0.05)
            gate.set()
            assert await blocker is True
            assert await asyncio.gather(*calls) == [n for n, _ in order]  # each call gets its own result
        finally:
            pool.close()

    asyncio.run(main())
    assert ran == ["pod-1", "pod-2", "read-1", "status-1", "status-2"]


def test_an_error_reaches_the_caller_and_the_worker_goes_on() -> None:
    def fail() -> None:
        raise ValueError("refused")

    async def main() -> int:
        pool = PriorityPool(workers=1)
        try:
            with pytest.raises(ValueError, match="refused"):
                await pool.run(URGENT, fail)
            return await pool.run(READ, lambda: 7)
        finally:
            pool.close()

    assert asyncio.run(main()) == 7


def test_a_cancelled_caller_does_not_break_the_pool() -> None:
    gate = threading.Event()

    async def main() -> str:
        pool = PriorityPool(workers=1)
        try:
            slow = asyncio.ensure_future(pool.run(READ, lambda: gate.wait(30)))
            await asyncio.sleep(0.05)
            slow.cancel()  # e.g. the job's daemon is stopped while its call is in flight
            gate.set()
            return await pool.run(STATUS, lambda: "still serving")
        finally:
            pool.close()

    assert asyncio.run(main()) == "still serving"


def test_a_limited_priority_keeps_to_its_slots_and_others_do_not() -> None:
    lock = threading.Lock()
    running: dict[int, int] = {STATUS: 0, READ: 0}
    most: dict[int, int] = {STATUS: 0, READ: 0}

    def call(priority: int) -> None:
        with lock:
            running[priority] += 1
            most[priority] = max(most[priority], running[priority])
        time.sleep(0.05)
        with lock:
            running[priority] -= 1

    async def main() -> None:
        pool = PriorityPool(workers=8, limits={STATUS: 2})
        try:
            await asyncio.gather(*(pool.run(STATUS, lambda: call(STATUS)) for _ in range(8)))
            await asyncio.gather(*(pool.run(READ, lambda: call(READ)) for _ in range(8)))
        finally:
            pool.close()

    asyncio.run(main())
    assert most[STATUS] == 2
    assert most[READ] > 2  # 8 workers, 8 calls of 50 ms each: they overlap
