"""The leader's side of an averaging round (worker.replicas.sync_round): asking every follower for its
pseudo-gradient at once, taking the outer step under our own lock, and sending the outcome.

A follower that does not answer within the call's timeout is left out of the round, never
waited for; one on an older anchor gets the new anchor whole; one on a newer anchor than ours
means we are behind: then nobody moves, and the round's result names the peer to catch up from.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

import torch

from worker.compression import CodecError, Encoded
from worker.pipeline.errors import BadResponse, NoAnswer, PipelineError, RequestRejected
from worker.pipeline.executor import StageExecutor
from worker.pipeline.failover import RETRYABLE
from worker.pipeline.pacing import Pacer
from worker.pipeline.route import Replica
from worker.pipeline.stage_client import StageClient
from worker.pipeline.wire import Payload
from worker.replicas.diloco import ReplicaSync, pack, unpack
from worker.replicas.sync_round import (
    BEGIN,
    BEGIN_RETRIES,
    CALL_TIMEOUT_S,
    COMMIT,
    RoundResult,
    bulk_seconds,
    params_digest,
)


async def lead_round(client: StageClient, followers: Sequence[Replica], key: str, stage: torch.nn.Module,
                     executor: StageExecutor | None, sync: ReplicaSync, *,
                     timeout: float = CALL_TIMEOUT_S, pacer: Pacer | None = None) -> RoundResult:
    """Run one round with `followers` (the other live replicas of our stage) and report it; the
    updates go out at `pacer`'s rate when there is one (worker.pipeline.pacing)."""
    started = time.perf_counter()
    round_id = uuid.uuid4().hex
    count = len(list(stage.parameters()))
    timeout += bulk_seconds(stage, pacer)  # a paced pseudo-gradient or update takes its time
    before = client.stats.bytes_in
    problems: list[str] = []

    async def begin(replica: Replica) -> tuple[Replica, int, list[Encoded]] | None:
        client.add_addresses(replica.peer_id, replica.maddrs)
        for attempt in range(1 + BEGIN_RETRIES):
            try:
                reply = await client.call(replica.peer_id, key, BEGIN, Payload(meta={"round": round_id}), "none",
                                          timeout)
                anchor_round = reply.meta.get("anchor_round")
                if not isinstance(anchor_round, int) or isinstance(anchor_round, bool) or anchor_round < 0:
                    raise CodecError(f"anchor round {anchor_round!r}")
                return replica, anchor_round, unpack(reply.tensors, reply.meta.get("encoded"), count)
            except (BadResponse, NoAnswer) as err:
                if attempt < BEGIN_RETRIES:
                    # an answer cut short on the way, or a stream that broke before the request
                    # reached the follower (seen on 2 busy cores): asking again is safe, since a
                    # follower answers a repeated begin with the pseudo-gradient it already took
                    continue
                problems.append(_why(err))
            except (PipelineError, CodecError, *RETRYABLE) as err:
                problems.append(_why(err))
                break
        return None  # it drops the round after HOLD_S; it rejoins at the next round

    answered = [a for a in await asyncio.gather(*(begin(r) for r in followers)) if a is not None]
    ahead = max(answered, key=lambda a: a[1], default=None)
    if ahead is not None and ahead[1] > sync.round:
        # the stage averaged without us (we stalled, or were away): our anchor is stale, and an
        # outcome from it would roll the others back. Nobody moves; we catch up from `ahead`.
        problems.append(f"behind the stage's anchor: round {sync.round}, peer {ahead[0].peer_id.to_base58()[-8:]} "
                        f"is at {ahead[1]}")
        return RoundResult(round_id, True, 1, 1, len(followers) - len(answered), params_digest(sync.anchor),
                           client.stats.bytes_in - before, time.perf_counter() - started, problems,
                           newer=ahead[0].peer_id.to_base58())
    on_anchor = [a for a in answered if a[1] == sync.round]
    outliers: list[str] = []

    def step_in_place() -> tuple[list[Encoded], list[torch.Tensor], list[torch.Tensor], str]:
        own = sync.pseudo_gradient(list(stage.parameters()), own=True)
        update = sync.outer_update([own, *(gradient for _, _, gradient in on_anchor)],
                                   stage_replicas=len(followers) + 1)
        senders = ["self", *(replica.peer_id.to_base58() for replica, _, _ in on_anchor)]
        outliers.extend(senders[i] for i in sync.outliers)
        old = sync.anchor  # apply replaces the list, never its tensors
        new = sync.apply(update, sync.round + 1)
        with torch.no_grad():
            for p, t in zip(stage.parameters(), new, strict=True):
                p.copy_(t.to(p.device, p.dtype))
        return update, new, old, params_digest(sync.anchor)

    if not answered:
        return RoundResult(round_id, True, 1, 1, len(followers), params_digest(sync.anchor),
                           client.stats.bytes_in - before, time.perf_counter() - started, problems)
    try:
        update, new, old, digest = await (executor.exclusive(step_in_place) if executor is not None
                                          else asyncio.to_thread(step_in_place))
    except CodecError as err:  # a follower's pseudo-gradient that does not decode: nobody moves
        problems.append(_why(err))
        return RoundResult(round_id, True, 1, 1, len(followers), params_digest(sync.anchor),
                           client.stats.bytes_in - before, time.perf_counter() - started, problems)
    update, new = sync.outgoing(update, new, old)
    parts, metas = pack(update)
    on_anchor_ids = {r.peer_id for r, _, _ in on_anchor}
    refused: list[str] = []  # followers that judged our outcome implausible

    async def commit(replica: Replica) -> bool:
        if replica.peer_id in on_anchor_ids:
            payload = Payload(list(parts), meta={"round": round_id, "kind": "update", "anchor_round": sync.round,
                                                 "encoded": metas}, roles=["raw"] * len(parts))
        else:  # on an older anchor: it gets the new one whole, once
            payload = Payload([t.clone() for t in new], meta={"round": round_id, "kind": "full",
                                                               "anchor_round": sync.round}, roles=["raw"] * len(new))
        try:
            reply = await client.call(replica.peer_id, key, COMMIT, payload, "none", timeout, pacer=pacer)
        except (PipelineError, *RETRYABLE) as err:
            problems.append(_why(err))
            if isinstance(err, RequestRejected) and err.kind == "outlier":
                refused.append(replica.peer_id.to_base58())
            return False
        return reply.meta.get("loaded") is True

    committed = sum(await asyncio.gather(*(commit(r) for r, _, _ in answered)))
    return RoundResult(round_id, True, 1 + len(on_anchor), 1 + committed, len(followers) - len(answered), digest,
                       client.stats.bytes_in - before, time.perf_counter() - started, problems, outliers,
                       len(refused))


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


__all__ = ["lead_round"]
