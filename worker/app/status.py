"""The worker's periodic status line for the volunteer's terminal (pure formatting)."""

from __future__ import annotations

import math

from protos import swarmtrain_pb2 as pb

STATUS_INTERVAL_S = 10.0


def status_line(stage: int, before: pb.Counters, now: pb.Counters, seconds: float, loss: float,
                usd_per_hour: float) -> str:
    """e.g. 'stage 1 · 12,345 tok/s · loss 2.310 · sent 1.2 MB/s · received 1.1 MB/s · compute 62% · $0.45/h'."""
    if stage < 0:
        return "status: waiting for a stage"
    seconds = max(seconds, 1e-9)
    sent = sum(t.sent_bytes for t in now.traffic) - sum(t.sent_bytes for t in before.traffic)
    received = sum(t.received_bytes for t in now.traffic) - sum(t.received_bytes for t in before.traffic)
    busy = now.compute_seconds - before.compute_seconds
    waited = now.wait_seconds - before.wait_seconds
    parts = [f"stage {stage}", f"{(now.tokens - before.tokens) / seconds:,.0f} tok/s"]
    if math.isfinite(loss):
        parts.append(f"loss {loss:.3f}")
    parts += [f"sent {sent / seconds / 1e6:,.1f} MB/s", f"received {received / seconds / 1e6:,.1f} MB/s"]
    if busy + waited > 0:
        parts.append(f"compute {busy / (busy + waited):.0%}")
    parts.append(f"step {now.local_step:,}")
    if usd_per_hour > 0:
        parts.append(f"${usd_per_hour:,.2f}/h")
    return " · ".join(parts)
