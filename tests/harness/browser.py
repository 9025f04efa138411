"""A real headless Chromium for tests, driven over the DevTools protocol on a pipe.

Debian's `chromium` package (deploy/quickstart.sh installs it for `test`) speaks the Chrome
DevTools Protocol on file descriptors 3 (commands in) and 4 (replies out) with
`--remote-debugging-pipe`: NUL-separated JSON, no port to race for and no Python package to
install. `Browser` opens one page and offers what tests need: evaluate JavaScript, wait on a
condition in the page with a deadline, take a screenshot. It always ends the browser's whole
process group.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

POLL_S = 0.1  # between two looks at the page while waiting on a condition
CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")


def chromium_path() -> str | None:
    """The browser binary: $SWARMTRAIN_CHROMIUM, else Debian's (the wrapper script's /dev/shm
    check misfires where /dev/shm is mounted twice, so the binary itself is preferred)."""
    for name in (os.environ.get("SWARMTRAIN_CHROMIUM", ""), *CANDIDATES):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


class Browser:
    def __init__(self, width: int = 1100, height: int = 700) -> None:
        binary = chromium_path()
        if binary is None:
            raise RuntimeError("no chromium: run `deploy/quickstart.sh test` as root (it installs Debian's "
                               "chromium package) or set SWARMTRAIN_CHROMIUM")
        self.profile = Path(tempfile.mkdtemp(prefix="swarmtrain-chromium-"))
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()

        def on_fds_3_and_4() -> None:  # in the child, before exec
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        env = {**os.environ, "XDG_CONFIG_HOME": str(self.profile), "XDG_CACHE_HOME": str(self.profile)}
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(3, 4, to_browser, from_browser), preexec_fn=on_fds_3_and_4,  # noqa: PLW1509 - fds only
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        os.close(to_browser)
        os.close(from_browser)
        self._out = os.fdopen(self._commands, "wb")
        self._in = os.fdopen(self._replies, "rb")
        self._buffer = b""
        self._ids: Iterator[int] = iter(range(1, 1 << 30))
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", self.session, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and return its result, skipping the events that come meanwhile."""
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        self._out.flush()
        while True:
            while b"\0" not in self._buffer:
                chunk = self._in.read1(1 << 16)
                if not chunk:
                    raise EOFError("chromium closed its DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        self.call("Page.navigate", self.session, url=url)

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_js(self, expression: str, timeout: float, what: str) -> Any:
        """Poll `expression` until it is truthy; its value, or TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page did not show {what} within {timeout:.0f}s")
            time.sleep(POLL_S)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", self.session, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(10)
        except (OSError, EOFError, RuntimeError, subprocess.TimeoutExpired):
            pass
        try:  # whatever of its group is left: renderers, the zygote
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for stream in (self._out, self._in):
            try:
                stream.close()
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
