"""kube.PriorityPool: the most urgent waiting API call goes first, then the oldest; results and
errors reach the awaiting coroutine. Real threads and a real event loop, no API server needed."""

from __future__ import annotations

import asyncio
import threading

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
