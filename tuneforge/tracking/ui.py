"""``tuneforge ui``: the MLflow UI over tuneforge's tracking store, bound to localhost by default.

``mlflow ui`` is an alias of ``mlflow server`` in MLflow 3, so we build the ``server`` argv: the same backend
store and artifact folder the runs use, one worker (the UI is for one person; MLflow's default is four), and
MLflow's background job runner off (it serves GenAI evaluation jobs tuneforge does not use, and would be one
more process to stop).

``mlflow server`` starts uvicorn (or gunicorn) as a child of its own, so stopping only the process we started
can leave the web server running and holding the port. The server therefore runs in its own process group,
and every way out of :func:`run_ui` — Ctrl-C, SIGTERM, the server exiting, an error — stops that whole
group: the signal first, SIGKILL for whatever is still there after a grace period.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from tuneforge.errors import TuneforgeError
from tuneforge.tracking.mlflow_tracker import artifact_root_for, resolve_tracking_uri


def ui_command(tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The ``python -m mlflow server …`` argv that serves ``tracking_uri`` (default: the embedded store)."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://", "databricks")):
        raise TuneforgeError(f"tracking URI {uri!r} is already an MLflow server: open it in a browser")
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(int(port)),
        "--workers",
        "1",
    ]
    root = artifact_root_for(uri)
    if root is not None:
        argv += ["--default-artifact-root", root.as_uri()]
    return argv


def ui_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the UI process: no usage telemetry unless asked for, no job runner."""
    env = dict(os.environ if base is None else base)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
GRACE_SECONDS = 10.0  # how long the server may take to shut down before its group is SIGKILLed


class _StopRequested(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """SIGTERM/SIGINT handlers: while ``armed``, a signal raises :class:`_StopRequested` out of the blocking wait;
    after that (and once shutdown has begun) a signal only sets ``hurry``, so the shutdown it would interrupt
    still runs to the end, just without waiting out the grace period."""

    def __init__(self) -> None:
        self.armed = True
        self.received: int | None = None
        self.hurry = False
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False
            self.received = signum
            raise _StopRequested(signum)
        self.hurry = True

    def __enter__(self) -> _Signals:
        self._previous = {sig: signal.signal(sig, self) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` still runs; zombies do not count (they only await reaping,
    and an orphan's zombie may wait forever where PID 1 does not reap, as in some containers)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal still exists
        return True
    if not os.path.isdir("/proc"):
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:  # exited while we looked
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]  # the name in (…) may hold spaces
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # already gone
        pass


def stop_group(
    proc: subprocess.Popen,
    sig: int = signal.SIGTERM,
    grace: float = GRACE_SECONDS,
    hurry: Callable[[], bool] = lambda: False,
) -> None:
    """Send ``sig`` to ``proc``'s process group, wait up to ``grace`` s for every member to exit, then SIGKILL it.

    ``proc`` must lead its own group (``start_new_session=True``). The leader is reaped while waiting, because
    an unreaped zombie still counts as a member; ``hurry()`` turning true (a second Ctrl-C) ends the wait early.
    """
    pgid = proc.pid
    _signal_group(pgid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not hurry():
        proc.poll()
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 2.0  # SIGKILL lands at once, but exiting (and freeing the port) takes a moment
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def run_ui(
    tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000, grace: float = GRACE_SECONDS
) -> int:
    """Run the UI in the foreground until Ctrl-C or SIGTERM; returns its exit status (128 + signal if stopped).

    However the call ends, no process of the server's group outlives it.
    """
    argv = ui_command(tracking_uri, host, port)
    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            raise TuneforgeError(f"port {port} on {host} is already in use; pick another with --port")
    print(
        f"MLflow UI for {argv[argv.index('--backend-store-uri') + 1]} at http://{host}:{port}  (Ctrl-C stops it)",
        flush=True,
    )
    with _Signals() as signals:
        proc: subprocess.Popen | None = None
        try:
            # Its own session: a terminal's Ctrl-C reaches only us, and we stop the server's whole group.
            proc = subprocess.Popen(argv, env=ui_env(), start_new_session=True)
            return proc.wait()
        except _StopRequested as stop:
            return 128 + stop.signum
        finally:
            signals.armed = False  # from here on a signal must not abort the clean-up
            if proc is not None:  # also when the server exited by itself: its children may not have
                # Forward the signal we got (uvicorn shuts down cleanly on either); SIGTERM otherwise.
                stop_group(proc, signals.received or signal.SIGTERM, grace, hurry=lambda: signals.hurry)
