"""``python -m tuneforge.service.runner EXIT_FILE -- COMMAND…``: run a job's command, record how it ended.

The local executor starts every job through this tiny wrapper in its own session, so the job outlives the
server (a SIGKILLed server leaves it running) and a restarted server — no longer its parent, unable to
``wait()`` — still learns the exit status from ``EXIT_FILE``. A stop (SIGTERM to the session) reaches the command
directly; the wrapper itself waits for it and writes its status either way.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from tuneforge.files import atomic_write


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m tuneforge.service.runner EXIT_FILE -- COMMAND…", file=sys.stderr)
        return 2
    exit_file, command = argv[0], argv[2:]
    # A handler, not SIG_IGN: the command must not inherit an ignored SIGTERM (dispositions survive exec).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    child = subprocess.Popen(command)
    while True:
        try:
            returncode = child.wait()
            break
        except InterruptedError:
            continue
    atomic_write(exit_file, json.dumps({"returncode": returncode}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
