"""Job processes on this machine, each in its own session so it survives the server.

The handle records the runner's PID and its start time (PIDs are reused; the pair is not) and the exit file;
that is all a restarted server needs to tell a live job from a finished or a lost one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from tuneforge.errors import TuneforgeError
from tuneforge.service.executors.base import Launch, Status


class LocalExecutor:
    def __init__(self, python: str | None = None) -> None:
        self.python = python or sys.executable
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # ours to reap (none after a restart)

    def start(self, launch: Launch) -> dict[str, Any]:
        launch.workdir.mkdir(parents=True, exist_ok=True)
        attempt = len(list(launch.workdir.glob("attempt-*.log")))
        exit_file = launch.workdir / f"exit-{attempt}.json"
        log_path = launch.workdir / f"attempt-{attempt}.log"
        command = [self.python, "-m", "tuneforge.service.runner", str(exit_file), "--"]
        command += [self.python, "-m", "tuneforge", *launch.train_args()]
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                command,
                cwd=launch.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **launch.env},
                start_new_session=True,  # its own process group: outlives the server, stopped as a group
            )
        self._children[popen.pid] = popen
        (launch.workdir / f"attempt-{attempt}.pid").write_text(str(popen.pid))  # for tools and tests
        return {
            "executor": "local",
            "pid": popen.pid,
            "started": psutil.Process(popen.pid).create_time(),
            "exit_file": str(exit_file),
            "log": str(log_path),
        }

    def _alive(self, handle: dict[str, Any]) -> bool:
        pid = int(handle["pid"])
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            self._children.pop(pid, None)
            return False
        try:
            proc = psutil.Process(pid)
            return proc.create_time() == handle["started"] and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def status(self, handle: dict[str, Any]) -> Status:
        exit_file = Path(handle["exit_file"])
        if exit_file.exists():
            self._alive(handle)  # reaps our child
            return Status("exited", int(json.loads(exit_file.read_text())["returncode"]))
        if self._alive(handle):
            return Status("running")
        if exit_file.exists():  # written between the two checks
            return Status("exited", int(json.loads(exit_file.read_text())["returncode"]))
        return Status("lost")

    def stop(self, handle: dict[str, Any], *, force: bool = False) -> None:
        """SIGTERM (or SIGKILL) the job's whole process group: the train process, its replicas, the runner."""
        if not self._alive(handle):
            return
        try:
            os.killpg(int(handle["pid"]), signal.SIGKILL if force else signal.SIGTERM)
        except ProcessLookupError:
            pass

    def scale(self, handle: dict[str, Any], run_dir: Path, replicas: int) -> bool:
        """Ask the elastic supervisor to resize; False while it has not started yet (no job.json)."""
        from tuneforge.distributed import scale

        try:
            scale(run_dir, replicas)
        except TuneforgeError:
            return False
        return True

    def log_tail(self, handle: dict[str, Any], n_bytes: int = 8192) -> str:
        try:
            with open(handle["log"], "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - n_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""
