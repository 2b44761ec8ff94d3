"""Run torchft's lighthouse (the quorum service every replica group heartbeats to) as a child process.

We use torchft's own ``torchft_lighthouse`` CLI rather than re-implementing quorum: it decides who is
in each step's quorum, drops replicas whose heartbeats stop (``heartbeat_timeout_ms`` — the failure
detection time) and admits joiners at the next step ("fast quorum"). The supervisor binds it to an
ephemeral port on 127.0.0.1 and reads the port from its start-up log line, so there is no port race.

For a run across several machines, :func:`serve` runs one standalone (``python -m tuneforge.distributed
lighthouse --bind 0.0.0.0:29510 --min-replicas 2``) and every node's supervisor is pointed at it with
``resilience.lighthouse``; see docs/multi-node.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tuneforge.distributed.network import advertised_host, format_host, host_problem, split_host_port
from tuneforge.errors import RecipeError, TuneforgeError

_LISTENING = re.compile(r"Lighthouse listening on: http://\S+:(\d+)")


def lighthouse_command() -> list[str]:
    """The ``torchft_lighthouse`` executable next to this interpreter, on PATH, or via ``python -c``."""
    beside = Path(sys.executable).parent / "torchft_lighthouse"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("torchft_lighthouse")
    if found:
        return [found]
    return [
        sys.executable,
        "-c",
        "import sys; from torchft._torchft import lighthouse_main; sys.exit(lighthouse_main())",
    ]


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
        advertise: str | None = None,
    ) -> None:
        self.min_replicas = min_replicas
        self.log_path = log_path
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.join_timeout_ms = join_timeout_ms
        self.quorum_tick_ms = quorum_tick_ms
        self.host = host  # bind address
        self.advertise = advertise  # what replicas are told; default host (the host name for 0.0.0.0)
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("lighthouse not started")
        return f"http://{format_host(advertised_host(self.host, self.advertise))}:{self.port}"

    def launch(self, port: int = 0) -> None:
        """Start the process; :meth:`wait_ready` returns its address once it listens."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            *lighthouse_command(),
            "--bind", f"{format_host(self.host)}:{port}",
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
                code = self.proc.returncode
                self.proc = None
                raise TuneforgeError(
                    f"torchft lighthouse on {format_host(self.host)}:{self.port or 0} exited with code {code} "
                    f"(port in use? address not on this machine?); see {self.log_path}"
                )
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


# -- standalone lighthouse for multi-node runs -----------------------------------------------------------
def serve(
    bind: str,
    min_replicas: int,
    *,
    advertise: str | None = None,
    heartbeat_timeout_ms: int = 1000,
    join_timeout_ms: int = 500,
    quorum_tick_ms: int = 50,
    log_path: Path | None = None,
    address_file: Path | None = None,
    on_ready: Callable[[str, int], None] | None = None,
) -> int:
    """Run a lighthouse in the foreground until SIGINT/SIGTERM; restart it on the same port if it dies.

    ``bind`` is ``HOST:PORT`` (``0.0.0.0:29510`` for every interface; port 0 picks a free one). The
    address the nodes should use (``http://ADVERTISE:PORT``) goes to ``address_file`` and, with the
    torchft process's PID, to ``on_ready``.
    The defaults of the timing options equal :class:`~tuneforge.distributed.config.ResilienceConfig`'s.
    """
    host, port = split_host_port(bind, "--bind")
    if advertise is not None and (problem := host_problem(advertise)):
        raise RecipeError(f"--advertise: got {advertise!r}, expected {problem}")
    if min_replicas < 1:
        raise RecipeError(f"--min-replicas: got {min_replicas}, expected >= 1")
    if heartbeat_timeout_ms < 1 or join_timeout_ms < 1 or quorum_tick_ms < 1:
        raise RecipeError("--heartbeat-timeout-ms, --join-timeout-ms, --quorum-tick-ms: expected positive numbers")
    if log_path is None:
        from tuneforge.paths import state_dir

        log_path = state_dir() / "logs" / "lighthouse.log"
    lh = Lighthouse(min_replicas, Path(log_path), heartbeat_timeout_ms, join_timeout_ms, quorum_tick_ms,
                    host=host, advertise=advertise)  # fmt: skip
    stop = {"signal": 0}

    def request_stop(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        address = lh.start(port=port)
        if address_file is not None:
            tmp = Path(address_file).with_name(f".{Path(address_file).name}.tmp")
            tmp.write_text(address + "\n")
            tmp.replace(address_file)
        if on_ready is not None and lh.proc is not None:
            on_ready(address, lh.proc.pid)
        while not stop["signal"]:
            if not lh.alive():
                lh.restart()
            time.sleep(0.2)
        return 0
    finally:
        lh.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m tuneforge.distributed lighthouse`` (and ``tuneforge lighthouse``)."""
    parser.add_argument(
        "--bind",
        default="0.0.0.0:29510",
        metavar="HOST:PORT",
        help="address to listen on (default 0.0.0.0:29510; port 0 = any free port)",
    )
    parser.add_argument(
        "--min-replicas", type=int, required=True, help="replicas (over all nodes) a quorum needs before the job trains"
    )
    parser.add_argument(
        "--advertise",
        metavar="HOST",
        help="name the nodes use to reach it (default: the bind address, or this host name for 0.0.0.0)",
    )
    parser.add_argument(
        "--heartbeat-timeout-ms",
        type=int,
        default=1000,
        help="a replica silent this long is dead (failure detection time)",
    )
    parser.add_argument(
        "--join-timeout-ms",
        type=int,
        default=500,
        help="after the first replica asks for a quorum, wait this long for the other live ones",
    )
    parser.add_argument("--quorum-tick-ms", type=int, default=50)
    parser.add_argument("--log", type=Path, help="torchft's log (default $TUNEFORGE_HOME/logs/lighthouse.log)")
    parser.add_argument("--address-file", type=Path, help="also write the address here once it listens")


def serve_from_args(args: argparse.Namespace) -> int:
    """Run :func:`serve` from parsed :func:`add_serve_arguments` options, printing where it listens."""

    def announce(address: str, pid: int) -> None:
        hostport = address.removeprefix("http://")
        print(
            f"lighthouse listening on {address} (bind {args.bind}, min_replicas {args.min_replicas}, pid {pid})",
            flush=True,
        )
        print(
            f"on every node: tuneforge train RECIPE --replicas MIN:MAX --set resilience.lighthouse={hostport} "
            "--set resilience.node=$(hostname) --set resilience.bind_host=<this node's IP>",
            flush=True,
        )

    return serve(args.bind, args.min_replicas, advertise=args.advertise,
                 heartbeat_timeout_ms=args.heartbeat_timeout_ms, join_timeout_ms=args.join_timeout_ms,
                 quorum_tick_ms=args.quorum_tick_ms, log_path=args.log, address_file=args.address_file,
                 on_ready=announce)  # fmt: skip
