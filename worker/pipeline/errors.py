"""Errors of the pipeline data plane, split by what the caller should do about them.

`RetryableError`s are about one replica (it died, timed out, answered garbage): the same
request may succeed on another replica of the stage. `RequestRejected` is about the
request itself (bad shape, non-finite values, too many tokens): every replica would refuse
it, so retrying elsewhere only wastes time.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error raised by worker.pipeline."""


class WireError(PipelineError):
    """A message that cannot be decoded: wrong framing, dtype, size, or non-finite values."""


class RequestRejected(PipelineError):
    """A stage refused a request; `kind` says why: "bad_request", "non_finite", "unauthorized",
    "stale" (a superseded attempt, or an anchor older than ours), or, in averaging rounds,
    "busy", "unavailable", "expired", "outlier". Not retryable."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class RetryableError(PipelineError):
    """A failure of one replica; another replica of the same stage may serve the request."""


class StageUnavailable(RetryableError):
    """The replica failed in its handler, does not serve the key, or (NoAnswer) closed the stream unanswered."""


class NoAnswer(StageUnavailable):
    """The stream closed before any answer came: the request may never have reached the handler."""


class BadResponse(RetryableError):
    """The replica answered something that is not a valid answer to the request."""


class NoReplicaAvailable(PipelineError):
    """Every replica of a stage failed or is cooling down after a failure."""
