"""The swarm at a glance: one JSON document for `/status.json`, the page at `/status` and
`coordinator status`, all built from the same GetSwarm view so that they cannot disagree.

`swarm_status` is pure (a GetSwarmResponse and the time in, plain data out); `format_status`
renders it for a terminal. Nothing in it lets one volunteer act as another: worker ids are
public (heartbeats need the session token too), and no address or token is included.
"""

from __future__ import annotations

import json
import math
from collections import deque
from typing import Any

from protos import swarmtrain_pb2 as pb

_KINDS = {pb.TRAFFIC_KIND_ACTIVATIONS: "activations", pb.TRAFFIC_KIND_GRADIENTS: "gradients",
          pb.TRAFFIC_KIND_STATE: "state"}


def state_name(state: int) -> str:
    return pb.WorkerState.Name(state).removeprefix("WORKER_STATE_").lower()


REACHABILITY = {pb.REACHABILITY_DIRECT: "direct", pb.REACHABILITY_UNREACHABLE: "unreachable"}  # else "unknown"
REACHABLE_WORDS = {"direct": "yes", "unreachable": "no (NAT)", "unknown": "?"}


def swarm_status(view: pb.GetSwarmResponse, now: float) -> dict[str, Any]:
    """The run, its progress and ETA, what bounds it, its stages and workers, its last checkpoint."""
    p = view.progress
    rate = p.measured_tokens_per_second or p.expected_tokens_per_second
    left = max(0, p.total_tokens - p.trained_tokens)
    stages = [{"index": s.stage_index, "layers": [s.layer_start, s.layer_end], "workers": s.active_workers,
               "planned_tokens_per_second": s.planned_tokens_per_second} for s in view.stages]
    bound = None
    if stages:
        slowest = min(stages, key=lambda s: s["planned_tokens_per_second"])
        bound = {"stage": slowest["index"], "planned_tokens_per_second": slowest["planned_tokens_per_second"],
                 "why": f"the slowest stage: layers {slowest['layers'][0]}-{slowest['layers'][1] - 1} on "
                        f"{slowest['workers']} worker(s)"}
    return {
        "generated_unix": now,
        "run": {"run_id": view.run_id, "config_hash": view.config_hash, "plan_version": view.plan_version,
                "generation": view.generation, "note": view.planner_note},
        "progress": {
            "trained_tokens": p.trained_tokens, "total_tokens": p.total_tokens,
            "fraction": p.trained_tokens / p.total_tokens if p.total_tokens else 0.0,
            "last_loss": p.last_loss if p.last_loss > 0 else None,
            "tokens_per_second": {"planned": p.tokens_per_second, "expected": p.expected_tokens_per_second,
                                  "measured": p.measured_tokens_per_second},
            "eta_s": left / rate if rate > 0 else None,
            "rollbacks": p.rollbacks, "rolled_back_tokens": p.rolled_back_tokens,
            "usd_per_hour": p.usd_per_hour, "usd_spent": p.usd_spent, "kwh_used": p.kwh_used,
            "traffic": {_KINDS.get(t.kind, str(t.kind)): {"sent_bytes": t.sent_bytes, "received_bytes": t.received_bytes}
                        for t in p.traffic},
        },
        "bound": bound,
        "stages": stages,
        "workers": [{"worker_id": w.worker_id, "public_name": w.public_name, "gpu": w.gpu_name or "cpu",
                     "stage": w.stage_index if w.stage_index >= 0 else None, "state": state_name(w.state),
                     "tokens_per_second": w.tokens_per_second, "tokens_total": w.tokens_total,
                     "joined_unix": w.joined_unix, "last_heartbeat_unix": w.last_heartbeat_unix,
                     "serves_state": w.serves_state,
                     "reachability": REACHABILITY.get(w.reachability, "unknown")}
                    for w in view.workers],
        "leaderboard": leaderboard(view.workers),
        "checkpoint": ({"id": view.last_checkpoint.checkpoint_id, "completed_unix": view.last_checkpoint.completed_unix,
                        "trained_tokens": view.last_checkpoint.trained_tokens,
                        "size_bytes": view.last_checkpoint.size_bytes}
                       if view.HasField("last_checkpoint") else None),
    }


LEADERBOARD_SIZE = 20


def leaderboard(workers: Any) -> list[dict[str, Any]]:
    """Volunteers by the tokens their stages processed, summed over their workers under one public
    name (a worker without one stands alone under its id): the top LEADERBOARD_SIZE."""
    board: dict[str, dict[str, Any]] = {}
    for w in workers:
        name = w.public_name or w.worker_id
        entry = board.setdefault(name, {"name": name, "workers": 0, "tokens": 0})
        entry["workers"] += 1
        entry["tokens"] += w.tokens_total
    total = sum(e["tokens"] for e in board.values())
    ranked = sorted(board.values(), key=lambda e: (-e["tokens"], e["name"]))[:LEADERBOARD_SIZE]
    return [{**e, "share": e["tokens"] / total if total else 0.0} for e in ranked]


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_status(status: dict[str, Any]) -> str:
    """The status as a terminal reads it: the run, progress, the bound, then a table per stage."""
    run, p, now = status["run"], status["progress"], status["generated_unix"]
    rates = p["tokens_per_second"]
    loss = f" · loss {p['last_loss']:.3f}" if p["last_loss"] is not None else ""
    lines = [(f"run {run['run_id']} · plan {run['plan_version']} · generation {run['generation']} · "
              f"config {run['config_hash']}"),
             (f"progress: {p['trained_tokens']:,} of {p['total_tokens']:,} tokens ({100 * p['fraction']:.1f}%)"
              f"{loss} · {rates['measured']:,.0f} tok/s measured, {rates['expected']:,.0f} expected · "
              f"ETA {_duration(p['eta_s'])}")]
    lines.append(f"cost: ${p['usd_per_hour']:,.2f}/h now · ${p['usd_spent']:,.2f} and {p['kwh_used']:,.1f} kWh so far")
    if run["note"]:
        lines.append(f"planner: {run['note']}")
    if status["bound"] is not None:
        b = status["bound"]
        lines.append(f"bound by stage {b['stage']}: {b['why']} ({b['planned_tokens_per_second']:,.0f} tok/s planned)")
    if status["checkpoint"] is not None:
        c = status["checkpoint"]
        lines.append(f"last checkpoint: {c['id']} at {c['trained_tokens']:,} tokens ({c['size_bytes']:,} bytes)")
    header = (f"  {'worker':<16} {'name':<20} {'gpu':<26} {'state':<8} {'reachable':<11} {'tok/s':>10} "
              f"{'heartbeat':>10}")
    groups: list[tuple[str, list[dict[str, Any]]]] = [
        ((f"stage {s['index']} · layers {s['layers'][0]}-{s['layers'][1] - 1} · {s['workers']} worker(s) · "
          f"{s['planned_tokens_per_second']:,.0f} tok/s planned"),
         [w for w in status["workers"] if w["stage"] == s["index"]]) for s in status["stages"]]
    staged = {s["index"] for s in status["stages"]}
    groups.append(("no stage", [w for w in status["workers"] if w["stage"] not in staged]))
    for title, workers in groups:
        if not workers and title == "no stage":
            continue
        lines += ["", title, header]
        for w in workers:
            age = f"{max(0.0, now - w['last_heartbeat_unix']):.0f}s ago" if w["last_heartbeat_unix"] else "never"
            lines.append(f"  {w['worker_id']:<16} {_clip(w['public_name'] or '-', 20):<20} {_clip(w['gpu'], 26):<26} "
                         f"{w['state']:<8} {REACHABLE_WORDS[w['reachability']]:<11} {w['tokens_per_second']:>10,.0f} "
                         f"{age:>10}")
    if any(e["tokens"] for e in status["leaderboard"]):
        lines += ["", "volunteers by tokens processed:"]
        lines += [f"  {i + 1:>2}. {_clip(e['name'], 30):<30} {e['tokens']:>14,} tokens  {100 * e['share']:5.1f}%  "
                  f"{e['workers']} worker(s)" for i, e in enumerate(status["leaderboard"][:10])]
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)  # a volunteer's name is untrusted input
    return text if len(text) <= width else text[: width - 1] + "…"


EVENTS_KEPT = 50


def changes(before: dict[str, Any] | None, after: dict[str, Any]) -> list[str]:
    """What happened between two statuses, as lines for the page's event list (pure): joins,
    state changes (gone, left, banned, back), re-plans with the planner's note, new checkpoints,
    rollbacks."""
    if before is None:
        return []
    out = []
    was = {w["worker_id"]: w for w in before["workers"]}
    for w in after["workers"]:
        who = f"{w['worker_id']}{' (' + _clip(w['public_name'], 40) + ')' if w['public_name'] else ''}"
        old = was.get(w["worker_id"])
        if old is None:
            out.append(f"{who} joined ({w['gpu']})")
        elif old["state"] != w["state"]:
            out.append(f"{who} is {w['state']} (was {old['state']})")
    if after["run"]["plan_version"] != before["run"]["plan_version"]:
        out.append(f"plan {after['run']['plan_version']}: {after['run']['note'] or 're-planned'}")
    new, old_c = after["checkpoint"], before["checkpoint"]
    if new is not None and (old_c is None or new["id"] != old_c["id"]):
        out.append(f"checkpoint {new['id']} complete at {new['trained_tokens']:,} tokens")
    if after["progress"]["rollbacks"] > before["progress"]["rollbacks"]:
        out.append(f"rolled back to a checkpoint ({after['progress']['rolled_back_tokens']:,} tokens undone in all)")
    return out


class StatusBoard:
    """The newest status as the HTTP thread serves it: refreshed on the event loop (where the swarm
    changes), read as whole bytes from the metrics thread, so a reader never sees a half-built one.
    It also keeps the recent events it saw happen between refreshes."""

    def __init__(self) -> None:
        self.json = b"{}"
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self._last: dict[str, Any] | None = None

    def publish(self, view: pb.GetSwarmResponse, now: float) -> None:
        status = swarm_status(view, now)
        for line in changes(self._last, status):
            self.events.appendleft({"unix": now, "what": line})
        self._last = status
        self.json = json.dumps({**status, "events": list(self.events)}, separators=(",", ":")).encode()

