"""Applies assignments to the worker's `StageRuntime`, one at a time, off the event loop.

Heartbeats go on while a stage builds; only the newest pending assignment matters: a switch
that arrives while another is in progress replaces any older one still waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from protos import swarmtrain_pb2 as pb
from worker.app.stage_runtime import StageRuntime

STOP_GRACE_S = 3.0  # how long leaving waits for a runtime busy building or switching


class AssignmentApplier:
    """Starts, switches and stops `runtime` as assignments come; `failed` is set (and `failure`
    holds the error) once the runtime's work dies, during a call or later."""

    def __init__(self, runtime: StageRuntime) -> None:
        self.runtime = runtime
        self.failure: BaseException | None = None
        self.failed = asyncio.Event()
        self._pending: list[pb.Assignment | None] = []  # at most one: the newest wish
        self._wake = asyncio.Event()
        self._running = False
        self._busy: asyncio.Future[Any] | None = None  # the runtime call in progress
        self._task = asyncio.create_task(self._serve())
        runtime.watch(self._fail)

    def _fail(self, err: BaseException) -> None:
        if self.failure is None:
            self.failure = err
            self.failed.set()

    def submit(self, assignment: pb.Assignment | None) -> None:
        """Switch to `assignment`, or release the stage when None (no stage for us now)."""
        self._pending[:] = [assignment]
        self._wake.set()

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            wanted = self._pending.pop()
            try:
                if wanted is None:
                    if self._running:
                        await self._run(self.runtime.stop)
                        self._running = False
                elif self._running:
                    await self._run(self.runtime.reassign, wanted)
                else:
                    await self._run(self.runtime.start, wanted)
                    self._running = True
            except Exception as err:  # noqa: BLE001 - reported to the lifecycle, which leaves
                self.failure = err
                self.failed.set()
                return

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._busy = in_daemon_thread(fn, *args)
        return await asyncio.shield(self._busy)  # cancelling us must not orphan the call

    async def close(self) -> None:
        """Stop serving and release the stage. A call still in progress gets STOP_GRACE_S to
        finish; past that it is left behind (a daemon thread cannot hold up the exit)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._busy is not None and not self._busy.done():
            await asyncio.wait({self._busy}, timeout=STOP_GRACE_S)
            if not self._busy.done():
                # never call stop() while start() still runs; when it ends (often failing, as the
                # daemon it talks to is shut down after us), its outcome is not news to anyone
                self._busy.add_done_callback(_settled_quietly)
                return
            if not self._busy.cancelled():
                self._busy.exception()  # seen: a failure while leaving changes nothing
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(in_daemon_thread(self.runtime.stop), STOP_GRACE_S)


def _settled_quietly(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: asyncio does not log "exception was never retrieved"


def in_daemon_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run `fn(*args)` in a daemon thread: unlike the default executor, an exiting worker
    does not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, err
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=f"stage-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return future
