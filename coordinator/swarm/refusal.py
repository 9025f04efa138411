"""A request the coordinator refuses, as a verdict (`Refusal`) and as the error the service answers.

The swarm's decision modules return `Refusal`s; the orchestrator raises them as `InvalidRequest`,
which the service (coordinator/api/service.py) turns into a gRPC status with the message.
"""

from __future__ import annotations

from dataclasses import dataclass


class InvalidRequest(ValueError):
    """A request that must be refused. `code` is the grpc.StatusCode name to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Refusal:
    code: str  # a grpc.StatusCode name
    message: str  # one line for the volunteer: what is wrong and what to do

    def error(self) -> InvalidRequest:
        return InvalidRequest(self.code, self.message)
