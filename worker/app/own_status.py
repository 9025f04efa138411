"""A volunteer's own view: what this worker does, why it waits, and what it has given the swarm.

Served on the worker's metrics port beside /metrics: `/status.json`, and `/status`, a small page
that redraws from it. Built from the same CounterBook totals the heartbeats report, so the
figures are the ones the coordinator counts. Estimated energy is the GPU's board power over the
time it computed (the catalog's figure: an upper bound; a CPU worker reports none).
"""

from __future__ import annotations

import json
from typing import Any

from protos import swarmtrain_pb2 as pb

JOULES_PER_KWH = 3.6e6


def volunteer_status(totals: pb.Counters, *, worker_id: str, public_name: str, stage: int, waiting: str,
                     gpu: str, board_watts: float, usd_per_hour: float, started_unix: float,
                     now: float) -> dict[str, Any]:
    """The worker's view as plain data (pure)."""
    sent = sum(t.sent_bytes for t in totals.traffic)
    received = sum(t.received_bytes for t in totals.traffic)
    return {
        "generated_unix": now,
        "worker_id": worker_id, "public_name": public_name, "gpu": gpu or "cpu",
        "stage": stage if stage >= 0 else None,
        "doing": f"training stage {stage}" if stage >= 0 else f"waiting: {waiting or 'for a stage'}",
        "uptime_s": max(0.0, now - started_unix),
        "contributed": {
            "tokens": totals.tokens, "samples": totals.samples, "optimizer_steps": totals.local_step,
            "compute_hours": totals.compute_seconds / 3600, "waiting_hours": totals.wait_seconds / 3600,
            "kwh_estimated": board_watts * totals.compute_seconds / JOULES_PER_KWH,
            "sent_bytes": sent, "received_bytes": received,
        },
        "usd_per_hour": usd_per_hour,
    }


def status_json(status: dict[str, Any]) -> bytes:
    return json.dumps(status, separators=(",", ":")).encode()


VOLUNTEER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>swarmtrain worker</title>
<style>body{font:15px/1.5 system-ui,sans-serif;margin:1.5em;color:#1d2330}td{padding:2px 14px 2px 0}
td:last-child{text-align:right}h1{font-size:20px;margin:0}#doing{color:#3a7bd5;margin:.3em 0 1em}</style></head>
<body><h1 id="who">swarmtrain worker</h1><div id="doing">loading…</div><table id="facts"></table>
<script>
"use strict";
function row(t, k, v) { const r = t.insertRow(); r.insertCell().textContent = k; r.insertCell().textContent = v; }
function n(x, d) { return Number(x).toLocaleString("en-US", {maximumFractionDigits: d || 0}); }
async function refresh() {
  try {
    const s = await (await fetch("status.json", {cache: "no-store"})).json(), c = s.contributed;
    document.getElementById("who").textContent = (s.public_name || s.worker_id || "this worker") + " · " + s.gpu;
    document.getElementById("doing").textContent = s.doing;
    const t = document.createElement("table");
    row(t, "tokens processed", n(c.tokens));
    row(t, "optimizer steps", n(c.optimizer_steps));
    row(t, "compute hours", n(c.compute_hours, 2));
    row(t, "hours waiting on the pipeline", n(c.waiting_hours, 2));
    row(t, "energy (estimated, kWh)", n(c.kwh_estimated, 2));
    row(t, "sent / received (MB)", n(c.sent_bytes / 1e6, 1) + " / " + n(c.received_bytes / 1e6, 1));
    row(t, "up for", n(s.uptime_s / 3600, 2) + " h");
    t.id = "facts";
    document.getElementById("facts").replaceWith(t);
  } catch (e) { document.getElementById("doing").textContent = "this worker does not answer: " + e; }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
