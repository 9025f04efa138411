"""Helper processes that never see the terminal's Ctrl-C, without losing a press meant for us.

A Ctrl-C in a terminal sends SIGINT to the whole foreground process group: to the coordinator or
worker, and to the helpers they start (hivemind's forked DHT process, its Go `p2pd` daemons),
which would die with tracebacks of their own before their owner shut them down in order.
Ignoring the signal while a helper starts (SIG_IGN is inherited across fork and exec) shields
the helper, but it also throws away a press that arrives meanwhile: a volunteer pressing Ctrl-C
while the daemon starts saw nothing happen. Blocking it instead shields the helper just as well
(a new process inherits the signal mask, and neither Python nor Go unblocks SIGINT), and the
press stays pending for us: it is delivered the moment the block ends. Shared by both roles.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def shielded_children(*signals: signal.Signals) -> Iterator[None]:
    """Processes started inside (from this thread) never receive `signals` (default: SIGINT);
    one sent to us meanwhile is delivered when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals or (signal.SIGINT,)))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
