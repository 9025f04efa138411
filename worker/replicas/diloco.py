"""DiLoCo-style state of a stage replica: the stage's global parameters and the outer step.

Between rounds every replica trains on its own (the inner AdamW). All replicas of a stage share
the *anchor*: the global parameters after the last round, numbered by `round`. In a round,

- each replica sends its pseudo-gradient, anchor - its parameters, compressed with the stage's
  sync codec through error feedback (what a codec drops is sent in a later round);
- the leader averages the pseudo-gradients of the replicas on its anchor, takes an outer
  Nesterov-momentum step, `u = lr * (g + mu * m)` with `m = mu * m + g`, and compresses `u`
  (again through error feedback);
- every replica sets its anchor to `anchor - decode(u)`, and its parameters to that plus what it
  trained since it took its pseudo-gradient (worker.replicas.sync_round). Decoding is
  deterministic, so all of them hold bit-identical anchors afterwards, and replicas that did
  not train meanwhile bit-identical parameters.

With lr 1, momentum 0 and the `none` codec a round is exactly parameter averaging. A replica
whose anchor is from an older round (it missed one) is left out of the mean and receives the
new anchor whole; a new replica downloads the anchor and its round number once.

Followers do not take a round's outcome on trust: `implausible_outcome` refuses one that moves
the anchor further than an honest round can (a lying leader's), see there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import InitVar, dataclass
from typing import Any

import torch

from configs.codecs import CodecChoice
from worker.compression import CodecError, Encoded, ErrorFeedback, codec_for, decode_any, get_codec

MAX_PARTS_PER_TENSOR = 8
# A follower refuses a round's outcome that moves its anchor by more than both of these: this
# many times its own training since the anchor (scaled by the outer step's largest gain), and
# this share of the anchor's norm. An honest outcome is a clipped mean of replicas that trained
# about as long as this one; the second bound keeps a replica that trained little (it just
# joined, or runs on a slow card) from refusing honest leaders.
PLAUSIBLE_DRIFT_FACTOR = 10.0
PLAUSIBLE_ANCHOR_SHARE = 1.0
# With this many replicas a round's mean is replaced by CenteredClip: a lying minority cannot
# drag the stage; with two, neither can be told from the other and the mean stays.
ROBUST_FROM = 3


@dataclass(frozen=True)
class OuterSettings:
    """The outer optimizer and the codec of a stage's rounds (from the run config and the assignment).

    `codec` may also be given as a name, with any of `block_size`, `topk_fraction` and `rank`
    (the rest take CodecChoice's defaults); it is a CodecChoice either way.
    """

    lr: float = 1.0
    momentum: float = 0.0
    codec: CodecChoice = CodecChoice()
    block_size: InitVar[int | None] = None
    topk_fraction: InitVar[float | None] = None
    rank: InitVar[int | None] = None

    def __post_init__(self, block_size: int | None, topk_fraction: float | None, rank: int | None) -> None:
        given = {k: v for k, v in (("block_size", block_size), ("topk_fraction", topk_fraction),
                                   ("rank", rank)) if v is not None}
        if isinstance(self.codec, str):
            object.__setattr__(self, "codec", CodecChoice(self.codec, **given))
        elif given:
            raise ValueError("give codec parameters in the CodecChoice, not beside it")


class ReplicaSync:
    """One replica's anchor, round number, error-feedback residuals and (as leader) outer momentum."""

    def __init__(self, params: Sequence[torch.Tensor], settings: OuterSettings, *,
                 lie_scale: float | None = None) -> None:
        self.settings = settings
        # a deliberately faulty replica (worker --lie-scale, for resilience tests): its
        # pseudo-gradients are scaled by this factor, e.g. -1000 for sign-flipped garbage
        self.lie_scale = lie_scale
        self.anchor = [p.detach().to("cpu", torch.float32, copy=True) for p in params]
        self.round = 0
        self._momentum: list[torch.Tensor] | None = None
        self.outliers: list[int] = []  # replicas the last outer_update clipped hard (indices in its input)
        # how far the last pseudo-gradient taken says this replica moved: its norm, or what was
        # sent if a lying replica scaled it up (a follower's yardstick, see implausible_outcome)
        self.moved_norm = 0.0
        self._sent = self._feedback()  # our pseudo-gradients
        self._broadcast = self._feedback()  # the outer updates we send as leader

    def _feedback(self) -> list[ErrorFeedback]:
        return [ErrorFeedback(codec_for(self.settings.codec, seed=i)) for i in range(len(self.anchor))]

    def configure(self, settings: OuterSettings) -> None:
        """A new codec or outer step from a re-assignment; residuals of the old codec are dropped."""
        if settings != self.settings:
            self.settings = settings
            self._sent, self._broadcast = self._feedback(), self._feedback()

    @property
    def momentum(self) -> list[torch.Tensor] | None:
        """The outer momentum, once this replica has led a round (saved with checkpoints)."""
        return self._momentum

    def reset(self, anchor: Sequence[torch.Tensor], round_number: int,
              momentum: Sequence[torch.Tensor] | None = None) -> None:
        """Adopt another replica's anchor (a download, a round this replica missed, a checkpoint)."""
        self.anchor = []  # the old anchor goes first: a large stage's copies never coexist
        self.anchor = [t.detach().to("cpu", torch.float32, copy=True) for t in anchor]
        self.round = round_number
        self._momentum = [t.detach().to("cpu", torch.float32, copy=True) for t in momentum] if momentum else None
        self._sent, self._broadcast = self._feedback(), self._feedback()

    def adopt(self, params: Sequence[torch.Tensor]) -> None:
        """A replica alone in its stage: its parameters are the stage's, and the next round number's.
        Without this the anchor (what a joining replica downloads) would stay at the seed."""
        self.reset(params, self.round + 1)

    def pseudo_gradient(self, params: Sequence[torch.Tensor], *, own: bool = False) -> list[Encoded]:
        """anchor - params, compressed; call under the stage's lock. `own`: for the leader's own
        aggregate, which a lying replica keeps honest, as it keeps its own outcome (outgoing):
        its lie is in what it sends. Lying to itself, a leader alone on its anchor (its followers
        refused its last outcome) would step by its own lie and stop training, and so stop lying."""
        deltas = [a - p.detach().to("cpu", torch.float32) for a, p in zip(self.anchor, params, strict=True)]
        self.moved_norm = norm_of(deltas) * max(1.0, abs(self.lie_scale or 1.0))
        if self.lie_scale is not None and not own:
            deltas = [d.mul_(self.lie_scale) for d in deltas]
        return [fb.encode(d) for fb, d in zip(self._sent, deltas, strict=True)]

    def outer_update(self, gradients: Sequence[Sequence[Encoded]], stage_replicas: int = 0) -> list[Encoded]:
        """The leader's step: the compressed outer update from the replicas' pseudo-gradients, its
        own first.

        In a stage of ROBUST_FROM replicas or more (`stage_replicas`, or as many as sent), they are
        combined with CenteredClip rather than averaged, so one replica sending garbage moves the
        stage by a bounded amount; `self.outliers` then lists the indices (in `gradients`) of
        replicas that were clipped hard. When fewer than ROBUST_FROM of such a stage answered, the
        median cannot outvote anyone: the others are clipped around the leader's own instead.
        """
        s = self.settings
        if self._momentum is None:
            self._momentum = [torch.zeros_like(a) for a in self.anchor]
        decoded = [[_decoded(replica[i], anchor) for i, anchor in enumerate(self.anchor)] for replica in gradients]
        if len(decoded) >= ROBUST_FROM:
            combined, self.outliers = centered_clip(decoded)
        elif stage_replicas >= ROBUST_FROM:
            combined, self.outliers = clipped_around_first(decoded)
        else:  # two replicas: neither can be told from the other
            combined, self.outliers = [torch.stack(ts).mean(0) for ts in zip(*decoded, strict=True)], []
        updates = []
        for i, (mean, momentum) in enumerate(zip(combined, self._momentum, strict=True)):
            momentum.mul_(s.momentum).add_(mean)
            updates.append(self._broadcast[i].encode(mean.add(momentum, alpha=s.momentum).mul_(s.lr)))
        return updates

    def outgoing(self, update: list[Encoded], new: list[torch.Tensor],
                 old: list[torch.Tensor]) -> tuple[list[Encoded], list[torch.Tensor]]:
        """What a leader sends of a round that moved its anchor from `old` to `new` with `update`:
        the update (to followers on `old`) and the new anchor (to those behind). A lying replica
        (lie_scale) sends both with the move scaled, and keeps the honest one for itself, as an
        attacker that means to stay in the swarm would."""
        if self.lie_scale is None:
            return update, new
        plain = get_codec("none")
        lying = [plain.encode(decode_any(u) * self.lie_scale) for u in update]
        return lying, [o + (n - o) * self.lie_scale for n, o in zip(new, old, strict=True)]

    def propose(self, update: Sequence[Encoded]) -> list[torch.Tensor]:
        """anchor - decode(update): the anchor `update` leads to, without adopting it."""
        if len(update) != len(self.anchor):
            raise CodecError(f"an update of {len(update)} tensors for a stage of {len(self.anchor)}")
        return [a - _decoded(u, a) for a, u in zip(self.anchor, update, strict=True)]

    def accept(self, anchor: list[torch.Tensor], round_number: int) -> list[torch.Tensor]:
        """`anchor` (from `propose`) becomes the anchor of `round_number`; returns copies to load."""
        self.anchor, self.round = anchor, round_number
        return [t.clone() for t in anchor]

    def apply(self, update: Sequence[Encoded], round_number: int) -> list[torch.Tensor]:
        """anchor - decode(update) becomes the anchor of `round_number`; returns it (copies to load)."""
        return self.accept(self.propose(update), round_number)


def implausible_outcome(anchor: Sequence[torch.Tensor], outcome: Sequence[torch.Tensor], own: float,
                        settings: OuterSettings, rounds: int = 1) -> str | None:
    """Why moving from `anchor` to a round's `outcome` is more than an honest leader could ask of
    a replica that moved `own` (the norm of its pseudo-gradient) since `anchor`, `rounds` rounds
    ago; None if plausible (pure).

    An honest outcome is at most the largest replica's pseudo-gradient times the outer step's
    gain, lr / (1 - momentum), per round. Replicas of a stage train for about as long between
    rounds, so one that moves the anchor over PLAUSIBLE_DRIFT_FACTOR x that gain x `own`, and by
    more than PLAUSIBLE_ANCHOR_SHARE of the anchor's norm, per round, is refused. A leader that
    scales its outcome by a few is not caught: its followers' own drift is the yardstick.
    """
    step = norm_of([o - a for o, a in zip(outcome, anchor, strict=True)])
    if not math.isfinite(step):
        return "the round's outcome is not finite"
    size = norm_of(anchor)
    gain = settings.lr / (1 - settings.momentum)
    rounds = max(1, rounds)
    if step > rounds * PLAUSIBLE_DRIFT_FACTOR * gain * own and step > rounds * PLAUSIBLE_ANCHOR_SHARE * size:
        return (f"the round's outcome moves the stage by {step:.3g}: {step / max(size, 1e-30):.3g}x its "
                f"parameters' norm, and over {PLAUSIBLE_DRIFT_FACTOR:g}x what an outer step of this "
                f"replica's own training ({own:.3g}) could" + (f" in {rounds} rounds" if rounds > 1 else ""))
    return None


def norm_of(tensors: Sequence[torch.Tensor]) -> float:
    """The L2 norm of all of `tensors` together (0 for none)."""
    parts = [torch.linalg.vector_norm(t.float()) for t in tensors]
    return float(torch.linalg.vector_norm(torch.stack(parts))) if parts else 0.0


def centered_clip(replicas: Sequence[Sequence[torch.Tensor]], iterations: int = 5,
                  outlier_factor: float = 4.0) -> tuple[list[torch.Tensor], list[int]]:
    """CenteredClip (Karimireddy et al., 2021) over whole pseudo-gradients (pure).

    Starts from the coordinate-wise median and moves toward each replica by at most a radius
    tau, the median distance of the replicas from that start: honest replicas, which agree
    roughly, pull with their full weight; one far away pulls by tau at most. Replicas more than
    `outlier_factor` x tau from the result are outliers: the result is computed again without
    them, so a liar that gave itself away moves the stage not even by tau. Returns the aggregate
    and the outliers' indices.
    """
    flat = torch.stack([torch.cat([t.reshape(-1) for t in replica]) for replica in replicas])

    def clip(rows: torch.Tensor) -> tuple[torch.Tensor, float]:
        center = rows.median(dim=0).values
        tau = float((rows - center).norm(dim=1).median())
        if tau > 0:
            for _ in range(iterations):
                diff = rows - center
                scale = (tau / diff.norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
                center = center + (diff * scale[:, None]).mean(0)
        return center, tau

    center, tau = clip(flat)
    distance = (flat - center).norm(dim=1)
    outliers = [i for i, d in enumerate(distance.tolist()) if d > outlier_factor * tau and d > 0]
    if outliers:
        center, _ = clip(flat[[i for i in range(len(flat)) if i not in outliers]])
    out, at = [], 0
    for t in replicas[0]:
        out.append(center[at:at + t.numel()].reshape(t.shape).clone())
        at += t.numel()
    return out, outliers


def clipped_around_first(replicas: Sequence[Sequence[torch.Tensor]],
                         outlier_factor: float = 4.0) -> tuple[list[torch.Tensor], list[int]]:
    """The mean after clipping every replica's distance from the first (the leader's own
    pseudo-gradient) to that one's norm (pure). For a round of a large stage that only a few
    answered: the leader trusts itself, and anyone else moves the result by a bounded amount;
    those more than `outlier_factor` x the radius away are outliers and left out. Returns the
    aggregate and the outliers' indices."""
    flat = torch.stack([torch.cat([t.reshape(-1) for t in replica]) for replica in replicas])
    own = flat[0]
    tau = float(own.norm())
    diff = flat - own
    distance = diff.norm(dim=1)
    outliers = [i for i, d in enumerate(distance.tolist()) if d > outlier_factor * tau and d > 0]
    kept = [i for i in range(len(flat)) if i not in outliers]  # the first is always kept
    scale = (tau / distance[kept].clamp_min(1e-30)).clamp(max=1.0)
    center = own + (diff[kept] * scale[:, None]).mean(0)
    out, at = [], 0
    for t in replicas[0]:
        out.append(center[at:at + t.numel()].reshape(t.shape).clone())
        at += t.numel()
    return out, outliers


def _decoded(encoded: Encoded, like: torch.Tensor) -> torch.Tensor:
    tensor = decode_any(encoded)
    if tuple(tensor.shape) != tuple(like.shape):
        raise CodecError(f"a {tuple(tensor.shape)} tensor where {tuple(like.shape)} belongs")
    return tensor.to(torch.float32)


# ---- on the wire: encoded tensors as a payload's parts and metadata -----------------------


def pack(encoded: Sequence[Encoded]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    parts, metas = [], []
    for e in encoded:
        parts.extend(e.parts)
        metas.append({"meta": e.meta, "parts": len(e.parts)})
    return parts, metas


def unpack(parts: Sequence[torch.Tensor], metas: object, count: int) -> list[Encoded]:
    """The `count` encoded tensors of a payload; CodecError if the layout does not add up."""
    if not isinstance(metas, list) or len(metas) != count:
        raise CodecError(f"expected {count} encoded tensors")
    out, at = [], 0
    for entry in metas:
        if not isinstance(entry, dict) or not isinstance(entry.get("meta"), dict):
            raise CodecError("an encoded tensor without its metadata")
        n = entry.get("parts")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_PARTS_PER_TENSOR:
            raise CodecError(f"an encoded tensor of {n!r} parts")
        if at + n > len(parts):
            raise CodecError("fewer parts than the metadata announces")
        out.append(Encoded(list(parts[at:at + n]), entry["meta"]))
        at += n
    if at != len(parts):
        raise CodecError("more parts than the metadata announces")
    return out
