"""``tuneforge ui`` stops the whole MLflow server — its uvicorn child too — when it is told to stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tuneforge.tracking.ui import stop_group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes that still run. A zombie does not: it holds no port and only awaits reaping (an orphan's
    zombie may wait forever where PID 1 does not reap). ``is_running`` compares start times, so a reused PID
    does not count either."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _running_in_group(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return _alive(members)


def _kill(procs: list[psutil.Process]) -> None:
    for p in _alive(procs):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_tuneforge_ui_stops_every_server_process(sig: signal.Signals, tmp_path: Path) -> None:
    port = _free_port()
    env = dict(os.environ, TUNEFORGE_HOME=str(tmp_path / "home"), MLFLOW_DISABLE_TELEMETRY="true")
    log_path = tmp_path / "ui.log"
    with log_path.open("wb") as log:
        ui = subprocess.Popen(
            [sys.executable, "-m", "tuneforge", "ui", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    top = psutil.Process(ui.pid)
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180  # importing mlflow is slow on a busy machine
        while time.monotonic() < deadline and ui.poll() is None and not _answers(port):
            time.sleep(0.5)
        assert _answers(port), f"the UI never listened on {port}:\n{log_path.read_text()[-3000:]}"
        descendants = top.children(recursive=True)
        assert descendants, "the server should run as a child of tuneforge"
        server_group = os.getpgid(descendants[0].pid)
        assert server_group != os.getpgid(ui.pid), "the server should lead a process group of its own"

        ui.send_signal(sig)  # to the tuneforge process only, as a service manager or `kill PID` would
        code = ui.wait(timeout=60)

        # run_ui waited for the group itself; a SIGKILLed straggler may still need a moment to be reaped.
        deadline = time.monotonic() + 10
        while _alive(descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = _alive(descendants)
        assert not survivors, f"still running after {sig.name}: {[(p.pid, p.cmdline()) for p in survivors]}"
        assert not _running_in_group(server_group)
        assert not _answers(port), f"something still listens on 127.0.0.1:{port}"
        assert code == 128 + sig  # the shell convention for "stopped by this signal"
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.wait()
        _kill(descendants)


def test_stop_group_kills_a_child_that_ignores_sigterm_and_its_grandchild(tmp_path: Path) -> None:
    # A leader that ignores SIGTERM, with a grandchild that ignores it too: only the SIGKILL fallback stops them.
    ready = tmp_path / "ready"
    script = (
        "import signal, subprocess, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        f"pathlib.Path({str(ready)!r}).write_text(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    procs = [psutil.Process(leader.pid)]
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        procs.append(psutil.Process(int(ready.read_text())))
        assert os.getpgid(procs[1].pid) == leader.pid  # the grandchild is in the leader's group

        stop_group(leader, signal.SIGTERM, grace=0.5)

        assert leader.returncode == -signal.SIGKILL  # SIGTERM was ignored; the fallback did it
        deadline = time.monotonic() + 10
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(procs)
        assert not _running_in_group(leader.pid)
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()
        _kill(procs)
