"""``tuneforge ui``: the MLflow UI over tuneforge's tracking store, bound to localhost by default.

``mlflow ui`` is an alias of ``mlflow server`` in MLflow 3, so we build the ``server`` argv: the same backend
store and artifact folder the runs use, one worker (the UI is for one person; MLflow's default is four), and
MLflow's background job runner off (it serves GenAI evaluation jobs tuneforge does not use, and would be one
more process to stop).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tuneforge.errors import TuneforgeError
from tuneforge.tracking.mlflow_tracker import artifact_root_for, resolve_tracking_uri


def ui_command(tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The ``python -m mlflow server …`` argv that serves ``tracking_uri`` (default: the embedded store)."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://", "databricks")):
        raise TuneforgeError(f"tracking URI {uri!r} is already an MLflow server: open it in a browser")
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--host", host, "--port", str(int(port)), "--workers", "1"]
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


def run_ui(tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the UI in the foreground until Ctrl-C; returns its exit status."""
    argv = ui_command(tracking_uri, host, port)
    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            raise TuneforgeError(f"port {port} on {host} is already in use; pick another with --port")
    print(f"MLflow UI for {argv[argv.index('--backend-store-uri') + 1]} at http://{host}:{port}  (Ctrl-C stops it)",
          flush=True)
    proc = subprocess.Popen(argv, env=ui_env())
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to the server too; give it time to stop
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            return proc.wait()
