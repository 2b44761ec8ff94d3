"""Run torchft's lighthouse (the quorum service every replica group heartbeats to) as a child process.

We use torchft's own ``torchft_lighthouse`` CLI rather than re-implementing quorum: it decides who is
in each step's quorum, drops replicas whose heartbeats stop (``heartbeat_timeout_ms`` — the failure
detection time) and admits joiners at the next step ("fast quorum"). It binds an ephemeral port on
127.0.0.1 and we read the port from its start-up log line, so there is no port race.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tuneforge.errors import TuneforgeError

_LISTENING = re.compile(r"Lighthouse listening on: http://[^:\s]+:(\d+)")


def lighthouse_command() -> list[str]:
    """The ``torchft_lighthouse`` executable next to this interpreter, on PATH, or via ``python -c``."""
    beside = Path(sys.executable).parent / "torchft_lighthouse"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("torchft_lighthouse")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from torchft._torchft import lighthouse_main; sys.exit(lighthouse_main())"]


class Lighthouse:
    """A torchft lighthouse child process; ``address`` is what replicas pass to their Manager."""

    def __init__(
        self,
        min_replicas: int,
        log_path: Path,
        heartbeat_timeout_ms: int = 1000,
        join_timeout_ms: int = 500,
        quorum_tick_ms: int = 50,
        host: str = "127.0.0.1",
    ) -> None:
        self.min_replicas = min_replicas
        self.log_path = log_path
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.join_timeout_ms = join_timeout_ms
        self.quorum_tick_ms = quorum_tick_ms
        self.host = host
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("lighthouse not started")
        return f"http://{self.host}:{self.port}"

    def launch(self, port: int = 0) -> None:
        """Start the process; :meth:`wait_ready` returns its address once it listens."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = lighthouse_command() + [
            "--bind", f"{self.host}:{port}",
            "--min_replicas", str(self.min_replicas),
            "--join_timeout_ms", str(self.join_timeout_ms),
            "--quorum_tick_ms", str(self.quorum_tick_ms),
            "--heartbeat_timeout_ms", str(self.heartbeat_timeout_ms),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout_s: float = 60.0) -> str:
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                match = _LISTENING.search(f.read().decode(errors="replace"))
            if match:
                self.port = int(match.group(1))
                return self.address
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise TuneforgeError(f"torchft lighthouse did not start within {timeout_s:.0f}s; see {self.log_path}")

    def start(self, timeout_s: float = 60.0, port: int = 0) -> str:
        self.launch(port)
        return self.wait_ready(timeout_s)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> str:
        """Start again on the same port (replicas keep their address) after the process died."""
        self.stop()
        return self.start(port=self.port or 0)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
