"""The control plane's refusals and silences as one line a volunteer can act on, with an exit code."""

from __future__ import annotations

import grpc

UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
USER_MISTAKE = 2  # exit code: the command line must change
UNAVAILABLE_NOW = 1  # exit code: nothing to fix locally; try again later


class CoordinatorError(Exception):
    """A one-line problem for the volunteer; `exit_code` 2 means their command must change."""

    def __init__(self, message: str, exit_code: int = UNAVAILABLE_NOW) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def explain_rpc_error(rpc: str, code: grpc.StatusCode, details: str, endpoint: str) -> CoordinatorError:
    """One line a volunteer can act on, for a call the coordinator refused or never answered."""
    details = details.splitlines()[0][:200] if details else code.name.lower()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = "no answer in time"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        # banned by its peers' reports, or its join token revoked: restarting as is will not help
        return CoordinatorError(details, USER_MISTAKE)  # "worker w-… was banned after …": says it all
    if code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("join token ") and "revoked" in details:
        return CoordinatorError(f"the coordinator refused the join token: {details}", USER_MISTAKE)
    if code == grpc.StatusCode.UNAUTHENTICATED and "join token" in details:
        what = "requires" if details.startswith("no join token") else "refused"
        return CoordinatorError(
            f"the coordinator {what} the join token: "
            "pass --join-token TOKEN with the token the swarm's operator gave",
            USER_MISTAKE,
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION and rpc == "Join":
        return CoordinatorError(details, USER_MISTAKE)  # a software version the swarm does not run
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # a Join carries the volunteer's flags (name, memory); later calls only our own counters
        return CoordinatorError(f"the coordinator refused this worker's {rpc}: {details}",
                                USER_MISTAKE if rpc == "Join" else UNAVAILABLE_NOW)
    if code in UNREACHABLE:
        return CoordinatorError(
            f"cannot reach the coordinator at {endpoint} ({details}): "
            "is it running, and is its port open to you?"
        )
    return CoordinatorError(f"{rpc} at {endpoint} failed: {code.name}: {details}")
