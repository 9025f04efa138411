"""Who may call a stage's handlers: the admitted list, refreshed on time and on an unknown caller."""

from __future__ import annotations

import asyncio

from worker.pipeline.admission import MIN_REFRESH_S, REFRESH_S, Admission


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_admission_follows_the_coordinators_list_without_asking_on_every_call() -> None:
    clock, lists, reads = Clock(), [{"A"}, {"A", "B"}], []

    async def fetch() -> set[str]:
        reads.append(clock.now)
        return lists[min(len(reads) - 1, len(lists) - 1)]

    async def main() -> None:
        admission = Admission(fetch, clock)
        assert await admission.admits("A") and len(reads) == 1
        assert not await admission.admits("B")  # unknown, but the list is fresh: not re-read yet
        assert len(reads) == 1
        clock.now += MIN_REFRESH_S + 0.01  # an unknown caller triggers an early re-read
        assert await admission.admits("B") and len(reads) == 2
        assert await admission.admits("A") and len(reads) == 2
        clock.now += REFRESH_S + 0.01
        assert await admission.admits("A") and len(reads) == 3  # the periodic re-read

    asyncio.run(main())


def test_a_coordinator_outage_keeps_the_last_list() -> None:
    clock, calls = Clock(), []

    async def fetch() -> set[str]:
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("coordinator away")
        return {"A"}

    async def main() -> None:
        admission = Admission(fetch, clock)
        assert await admission.admits("A")
        clock.now += REFRESH_S + 1
        assert await admission.admits("A") and not await admission.admits("Z")

    asyncio.run(main())
