"""Finding the coordinator through the DHT: its rendezvous records, and the run to join among them."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from typing import Any

from configs.child_signals import shielded_children
from protos.rendezvous import COORDINATORS_KEY, RendezvousRecord, records_from_entry
from worker.app.rpc_errors import UNAVAILABLE_NOW, USER_MISTAKE, CoordinatorError

DISCOVERY_TIMEOUT_S = 30.0
DISCOVERY_POLL_S = 0.5


def choose_run(
    found: dict[str, RendezvousRecord], run_id: str | None, peers: list[str],
    waited_s: float = DISCOVERY_TIMEOUT_S,
) -> tuple[str, RendezvousRecord]:
    """The run to join among those found in the DHT, or a CoordinatorError that says why not."""
    if run_id is not None:
        if run_id in found:
            return run_id, found[run_id]
        others = f" (it lists: {', '.join(sorted(found))})" if found else ""
        raise CoordinatorError(
            f"no coordinator for run {run_id!r} found through --peers {' '.join(peers)}{others}: "
            "check --run-id",
            USER_MISTAKE if found else UNAVAILABLE_NOW,
        )
    if len(found) == 1:
        return next(iter(found.items()))
    if not found:
        raise CoordinatorError(
            f"no coordinator found through --peers {' '.join(peers)} within {waited_s:.0f}s: "
            "is it running? Or pass --coordinator HOST:PORT"
        )
    runs = ", ".join(f"{rid} at {rec.endpoint}" for rid, rec in sorted(found.items()))
    raise CoordinatorError(f"several runs share these peers ({runs}): pass --run-id to pick one",
                           USER_MISTAKE)


def explain_dht_error(err: BaseException, peers: list[str]) -> CoordinatorError:
    """hivemind's start-up failures, without the daemon's timestamps."""
    first_line = str(err).splitlines()[0] if str(err) else ""
    text = re.sub(r"^.*?\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\s*", "", first_line)
    hint = "is the coordinator running, and is its DHT port open to you?"
    if "parse multiaddr" in text or "invalid" in text:
        hint = "copy the address the coordinator printed after 'DHT:'"
    problem = text or repr(err)
    return CoordinatorError(f"cannot join the DHT through --peers {' '.join(peers)}: {problem}; {hint}",
                            USER_MISTAKE if "multiaddr" in text else UNAVAILABLE_NOW)


async def discover_coordinator(
    peers: list[str], run_id: str | None, timeout: float = DISCOVERY_TIMEOUT_S
) -> tuple[str, RendezvousRecord]:
    """Join the DHT as a client through `peers` and read the coordinators' rendezvous records.

    Returns (gRPC endpoint, record). Call from the main thread, before any gRPC channel
    exists: the DHT forks a child process.
    """
    import hivemind  # loads in seconds; only swarm mode needs it

    # Ctrl-C reaches the whole process group: the DHT child must leave it to us, or it dies
    # with a traceback of its own.
    try:
        with shielded_children(signal.SIGINT, signal.SIGTERM):
            dht = hivemind.DHT(initial_peers=peers, client_mode=True, start=True, shutdown_timeout=1)
    except Exception as err:  # noqa: BLE001 - hivemind reports bad peers as bare exceptions
        raise explain_dht_error(err, peers) from None
    try:
        deadline = time.monotonic() + timeout
        found: dict[str, RendezvousRecord] = {}
        while True:
            # awaited in the loop, not in a thread: a cancelled discovery leaves nothing behind
            lookup = dht.get(COORDINATORS_KEY, latest=True, return_future=True)
            try:
                entry = await asyncio.wait_for(lookup, max(1.0, deadline - time.monotonic()))
                found = records_from_entry(entry)
            except TimeoutError:
                found = {}
            if (found and run_id is None) or run_id in found or time.monotonic() > deadline:
                break
            await asyncio.sleep(DISCOVERY_POLL_S)
        _, record = choose_run(found, run_id, peers, timeout)
        return record.endpoint, record
    finally:
        await asyncio.to_thread(_shutdown_dht, dht)


def _shutdown_dht(dht: Any) -> None:
    dht.shutdown()
    dht.join(timeout=2)
    if dht.is_alive():
        dht.kill()
        dht.join(timeout=2)
