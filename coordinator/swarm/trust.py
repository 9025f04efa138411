"""When other workers' reports get a worker banned (pure: no I/O, no clock of its own).

Workers report, with each heartbeat, the peers whose messages they refused. A report is only a
claim: the coordinator never sees the refused message, so a lying worker could try to get an
honest peer banned. These rules bound what such a liar can do:

- Only `outlier` and `non_finite` count toward a ban. `malformed` and `unauthorized` also
  happen to honest peers (a release a patch apart, an admission list a few seconds stale).
- The reporter must be an active worker other than the target, and its strikes count only
  while it stays active: once it is banned, leaves or goes silent, its accusations drop out.
- The claim must fit the plan. Outliers show up in a stage's averaging rounds, so reporter and
  target must serve the same stage; non-finite tensors cross at most one stage boundary. A
  liar can only accuse the few peers the planner placed next to it, not anyone in the swarm.
- One reporter strikes a target at most once per half heartbeat interval, whatever counts it
  sends and however fast it beats; strikes older than STRIKE_WINDOW_S are forgotten, so a
  rare glitch on an honest machine does not add up to a ban over days.

What the rules do not require is several distinct reporters. A stage's outliers are found by
the one replica that leads its averaging rounds (a lying leader by its followers, each of which
refuses its outcome), so on a small swarm a single peer is often the only one in a position to
see them; requiring two would make bans impossible where a bad
GPU does the most harm. The price: one admitted liar next to an honest peer can get it banned
after `coordinator.ban_after_reports` heartbeat intervals. Join tokens bound who is admitted
in the first place, and revoking the liar's token expels it. Identities are cheap (a worker
that restarts has a new peer id), so a ban stops a faulty or careless worker for good, and a
determined attacker only until it restarts: the token is the operator's lasting lever.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container, Sequence
from dataclasses import dataclass

BANNABLE_REASONS = ("outlier", "non_finite")
STRIKE_WINDOW_S = 600.0


@dataclass(frozen=True)
class Strike:
    reporter: str  # worker id of the accuser
    reason: str
    at: float  # coordinator clock, seconds


def credible(reason: str, reporter_stage: int, target_stage: int) -> bool:
    """Whether, under the current plan, the reporter could have received such a message from the target."""
    if reason not in BANNABLE_REASONS or reporter_stage < 0 or target_stage < 0:
        return False
    if reason == "outlier":  # averaging rounds are among a stage's replicas
        return reporter_stage == target_stage
    return abs(reporter_stage - target_stage) <= 1  # activations, gradients and averaging


def add_strike(history: Sequence[Strike], strike: Strike, *, min_gap_s: float,
               window_s: float = STRIKE_WINDOW_S) -> tuple[Strike, ...]:
    """`history` without strikes older than `window_s`, plus `strike` unless its reporter struck
    within the last `min_gap_s`."""
    recent = tuple(s for s in history if strike.at - s.at < window_s)
    if any(s.reporter == strike.reporter and strike.at - s.at < min_gap_s for s in recent):
        return recent
    return (*recent, strike)


def ban_verdict(history: Sequence[Strike], threshold: int, live_reporters: Container[str]) -> str | None:
    """Why to ban (e.g. "5 outlier reports from 2 peers"), or None. Threshold 0 never bans;
    strikes from reporters no longer live do not count."""
    counted = [s for s in history if s.reporter in live_reporters]
    if threshold <= 0 or len(counted) < threshold:
        return None
    reasons = Counter(s.reason for s in counted)
    if len(reasons) == 1:
        what = f"{len(counted)} {next(iter(reasons))} reports"
    else:
        what = f"{len(counted)} reports ({', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))})"
    peers = len({s.reporter for s in counted})
    return f"{what} from {peers} peer{'' if peers == 1 else 's'}"
