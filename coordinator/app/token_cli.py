"""`coordinator token add|list|revoke`: the operator's join tokens in a state dir's registry.

Works whether or not a coordinator is serving from that state dir; a running one admits a new
token at once and expels the workers of a revoked one within a heartbeat interval.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from datetime import UTC, datetime

from configs.cli_args import add_config_arguments, config_from_args, fail
from coordinator.storage.join_tokens import JoinToken, TokenError, TokenStore

_ACTIONS = {
    "add": "issue a token under NAME and print it (only its hash is stored: it is shown once)",
    "list": "list the tokens: name, state, when issued and revoked",
    "revoke": "revoke NAME: refuse new joins with it and expel the workers it admitted",
}


def build_token_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator token",
        description="Issue, list and revoke join tokens for volunteers. Tokens live (hashed) in the "
        "coordinator's state dir, so a running coordinator picks up every change by itself.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="{add,list,revoke}")
    for action, summary in _ACTIONS.items():
        sub = actions.add_parser(action, help=summary, description=summary)
        if action != "list":
            sub.add_argument("name", metavar="NAME", help="e.g. the volunteer or group the token is for")
        sub.add_argument("--state-dir", metavar="DIR", help="the coordinator's --state-dir")
        add_config_arguments(sub)  # or the run config's coordinator.state_dir
    return parser


def token_main(argv: list[str]) -> int:
    args = build_token_parser().parse_args(argv)
    state_dir = _state_dir(args)
    try:
        store = TokenStore.open(state_dir)
        try:
            _run(args, store, state_dir)
        finally:
            store.close()
    except TokenError as err:
        fail(str(err))
    except sqlite3.Error as err:  # e.g. not a registry file, or locked past the busy timeout
        fail(f"state dir {state_dir}: {err}")
    return 0


def _state_dir(args: argparse.Namespace) -> str:
    if args.state_dir is not None:
        return args.state_dir
    if args.config is None:
        fail("pass --state-dir DIR (the coordinator's), or --config C to use its coordinator.state_dir")
    return config_from_args(args).coordinator.state_dir


def _run(args: argparse.Namespace, store: TokenStore, state_dir: str) -> None:
    now = time.time()
    if args.action == "add":
        token = store.add(args.name, now)
        print(f"join token {args.name} added to {state_dir}; it is shown only now: "
              "volunteers pass it as worker --join-token TOKEN", file=sys.stderr)
        print(token)
    elif args.action == "revoke":
        revoked = store.revoke(args.name, now)
        assert revoked.revoked_unix is not None
        if revoked.revoked_unix < now:
            print(f"join token {args.name} was already revoked at {_when(revoked.revoked_unix)}")
        else:
            print(f"join token {args.name} revoked: a running coordinator refuses it and expels the workers "
                  "it admitted within a heartbeat interval")
    else:
        print(token_table(store.all()))


def token_table(tokens: list[JoinToken]) -> str:
    """The `token list` output (pure)."""
    if not tokens:
        return "no join tokens yet: coordinator token add NAME --state-dir DIR"
    rows = [("NAME", "STATE", "ISSUED (UTC)", "REVOKED (UTC)")]
    rows += [(t.name, "revoked" if t.revoked else "active", _when(t.created_unix),
              _when(t.revoked_unix) if t.revoked_unix is not None else "-") for t in tokens]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S")
