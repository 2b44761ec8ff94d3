"""Run untrusted ``python`` grader code in a locked-down child process.

A grader's ``source`` comes from a config file someone may have downloaded, and GRPO calls it for every
completion, so it must neither see the host nor be able to kill the run. Each batch of (sample, item)
pairs goes to one fresh interpreter, layered from weakest to strongest guarantee:

1. **Process**: ``python -I -S -B`` (isolated mode: no ``PYTHON*`` variables, no user or site packages,
   no script directory on ``sys.path``), an *empty* environment (no API keys), a throw-away working
   directory, its own session (the whole group is killed on timeout), stdin fed once then closed.
2. **rlimits** (set between fork and exec): address space, CPU seconds, open files, file size,
   processes, no core dumps.
3. **Namespaces**: ``unshare -rnp --fork --kill-child`` (unprivileged user, network and PID namespaces)
   when the kernel allows it, else weaker forms down to nothing (see :func:`namespace_prefix`); inside
   there is no network interface but a down loopback, and no process outlives the sandbox.
4. **Landlock** (Linux ≥ 5.13, no root needed): the child restricts itself to read-only access to the
   Python standard library and system libraries, read-write access to its working directory, no
   ``execve`` anywhere, no TCP bind/connect (ABI ≥ 4) and no signals to outside processes (ABI ≥ 6).
5. **Audit hook** (``sys.addaudithook``, installed before the user's code is compiled into a
   function): refuses sockets, ``subprocess``/``os.system``/``exec*``/``fork``, ``ctypes``, file access
   outside the working directory, and tampering with the hook. It gives clear messages, but PEP 578 is
   explicit that hooks are not a security boundary — layers 3 and 4 are.

Limits per sample: CPU seconds via ``ITIMER_PROF`` inside the child (the grader's exception is caught,
the batch goes on), wall-clock seconds watched by the parent (the group is killed, the sample scores 0
and a fresh child grades the rest). A crash (segfault, ``os._exit``, out of memory) costs only the
sample that caused it. Results stream back one JSON line per sample over a private pipe; whatever the
grader prints goes to a captured stderr.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

STARTUP_SECONDS = 10.0  # interpreter start + Landlock + compiling the source, before the first sample
STDERR_KEEP = 8192  # bytes of the grader's own output kept for error messages
MIN_CHUNK = 64  # pairs per child before a batch is split across workers
RESULT_LINE_MAX = 1 << 20  # a result line is tiny; a megabyte without a newline is a grader misbehaving


@dataclass(frozen=True)
class Limits:
    """Resource limits for one sample (CPU, wall) and one sandbox process (memory, files)."""

    cpu_seconds: float = 5.0
    wall_seconds: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    open_files: int = 64
    batch_size: int = 512  # pairs per child process
    workers: int = 1  # child processes running at once for one batch
    site_packages: bool = False  # let graders import installed packages (numpy, sympy…) read-only

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "memory_mb", "file_size_mb", "open_files", "batch_size", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"limits.{name} must be a positive number (got {value!r})")


@dataclass
class Outcome:
    """What the sandbox made of one pair: a score, or ``None`` and an error saying why."""

    score: float | None
    error: str | None = None
    output: str = ""  # the tail of what the grader printed (stdout and stderr), for debugging


@dataclass
class _Run:
    results: dict[int, Outcome] = field(default_factory=dict)
    layers: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    failure: str | None = None  # why the child stopped early, charged to the first pair without a result
    stderr: str = ""


# ----------------------------------------------------------------------------------------- the child

# The child's whole program. It runs as `python -I -S -B -c _CHILD` in the sandbox's working directory,
# reads one JSON payload from stdin, locks itself down, then grades pair after pair.
_CHILD = r'''
import json, math, os, signal, sys


class SandboxViolation(PermissionError):
    pass


class SandboxImportError(ImportError):
    pass  # an ImportError, so packages that treat ctypes as optional (numpy) fall back instead of failing


class _CpuTimeout(BaseException):
    pass


def landlock(rw_dir, ro_paths, rw_files):
    """Restrict this process with Landlock; returns (abi, None) or (0, reason)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.restype = ctypes.c_int
    CREATE, ADD_RULE, RESTRICT = 444, 445, 446  # same numbers on every architecture
    abi = libc.syscall(ctypes.c_long(CREATE), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0, "Landlock unavailable: " + os.strerror(ctypes.get_errno())

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    fs_all = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1
    read_file, read_dir, write_file, truncate = 1 << 2, 1 << 3, 1 << 1, (1 << 14 if abi >= 3 else 0)
    attr = RulesetAttr(fs_all, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    ruleset = libc.syscall(ctypes.c_long(CREATE), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0, "landlock_create_ruleset: " + os.strerror(ctypes.get_errno())
    rules = [(rw_dir, fs_all)]
    rules += [(p, read_file | read_dir if os.path.isdir(p) else read_file) for p in ro_paths]
    rules += [(p, read_file | write_file | truncate) for p in rw_files]
    try:
        for path, allowed in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                rule = PathBeneath(allowed & fs_all, fd)
                added = libc.syscall(
                    ctypes.c_long(ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(1),  # 1: PATH_BENEATH
                    ctypes.byref(rule), ctypes.c_uint32(0),
                )
                if added < 0:
                    return 0, "landlock_add_rule(%s): %s" % (path, os.strerror(ctypes.get_errno()))
            finally:
                os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, required for unprivileged Landlock
            return 0, "prctl(NO_NEW_PRIVS): " + os.strerror(ctypes.get_errno())
        if libc.syscall(ctypes.c_long(RESTRICT), ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
            return 0, "landlock_restrict_self: " + os.strerror(ctypes.get_errno())
    finally:
        os.close(ruleset)
    return abi, None


def install_audit_hook(rw_dir, ro_paths, rw_files):
    realpath, fspath, fsdecode, sep = os.path.realpath, os.fspath, os.fsdecode, os.sep
    rw_roots, ro_roots = (rw_dir,), tuple(ro_paths)
    rw_files, write_flags = frozenset(rw_files), os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    denied = (
        "socket.", "ctypes.", "subprocess.", "_posixsubprocess", "os.exec", "os.spawn", "os.posix_spawn",
        "os.fork", "os.forkpty", "os.system", "os.kill", "os.killpg", "os.link", "os.symlink", "pty.",
        "signal.pthread_kill", "sys.addaudithook", "gc.get_referrers", "gc.get_referents", "gc.get_objects",
        "resource.setrlimit", "resource.prlimit", "sqlite3.enable_load_extension",
        "sqlite3.load_extension", "webbrowser.", "http.client.", "urllib.", "ftplib.", "smtplib.", "imaplib.",
        "poplib.", "nntplib.", "telnetlib.", "syslog.",
    )
    denied_imports = frozenset(
        {"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi", "_testinternalcapi"}
    )
    reads = {"os.listdir": (0,), "os.scandir": (0,), "os.getxattr": (0,), "os.listxattr": (0,)}
    writes = {
        "os.mkdir": (0,), "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.truncate": (0,),
        "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,), "os.chflags": (0,), "os.lchflags": (0,),
        "os.setxattr": (0,), "os.removexattr": (0,), "sqlite3.connect": (0,),
    }

    def inside(path, roots):
        return any(path == r or path.startswith(r + sep) for r in roots)

    def check(path, writing, what):
        if path is None or isinstance(path, int) or path == ":memory:":
            return  # an already-open descriptor, or sqlite's in-memory database
        full = realpath(fsdecode(fspath(path)))
        if inside(full, rw_roots) or full in rw_files:
            return
        if not writing and inside(full, ro_roots):
            return
        raise SandboxViolation(
            "sandbox: %s %s is not allowed (graders may only use their working directory)" % (what, full)
        )

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = bool(mode and any(c in mode for c in "wax+")) or bool(flags and flags & write_flags)
            check(path, writing, "writing" if writing else "reading")
        elif event in reads:
            for i in reads[event]:
                check(args[i] if len(args) > i else None, False, event)
        elif event in writes:
            for i in writes[event]:
                check(args[i] if len(args) > i else None, True, event)
        elif event.startswith(denied):
            raise SandboxViolation("sandbox: %s is not allowed in a grader" % event)
        elif event == "import" and args[0] in denied_imports:
            raise SandboxImportError("sandbox: importing %s is not allowed in a grader" % args[0])

    sys.addaudithook(hook)


def describe(error, limits):
    if isinstance(error, _CpuTimeout):
        return "CPU time limit of %gs exceeded" % limits
    line = None
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<grader>":
            line = tb.tb_lineno
        tb = tb.tb_next
    where = " (grader line %d)" % line if line else ""
    return "%s: %s%s" % (type(error).__name__, error, where)


def main():
    payload = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    out = os.dup(1)  # the private result channel; the grader's prints go to stderr
    os.dup2(2, 1)

    def emit(obj):
        os.write(out, (json.dumps(obj) + "\n").encode())

    rw_dir = os.path.realpath(os.getcwd())
    wanted = [p for p in sys.path if p] + payload["site_dirs"] + payload["system_paths"]
    ro_paths = [os.path.realpath(p) for p in wanted if os.path.exists(p)]
    sys.path.extend(payload["site_dirs"])
    layers = {"audit_hook": True}
    if payload["landlock"]:
        abi, why = landlock(rw_dir, ro_paths, payload["rw_files"])
        layers["landlock"] = abi if abi else why
    for name in [m for m in sys.modules if m == "_ctypes" or m == "ctypes" or m.startswith("ctypes.")]:
        del sys.modules[name]
    pairs, cpu = payload["pairs"], payload["cpu_seconds"]
    try:
        code = compile(payload["source"], "<grader>", "exec")
    except SyntaxError as e:
        emit({"ready": True, "layers": layers})
        for i in range(len(pairs)):
            emit({"i": i, "error": "grader source does not compile: %s (grader line %s)" % (e.msg, e.lineno)})
        return
    if payload["audit_hook"]:
        install_audit_hook(rw_dir, ro_paths, payload["rw_files"])
    else:
        layers["audit_hook"] = False
    emit({"ready": True, "layers": layers})

    def on_cpu_limit(signum, frame):
        raise _CpuTimeout()

    signal.signal(signal.SIGPROF, on_cpu_limit)
    namespace = {"__name__": "grader"}
    try:
        signal.setitimer(signal.ITIMER_PROF, cpu)
        try:
            exec(code, namespace)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        grade = namespace.get("grade")
        if not callable(grade):
            raise NameError("the source must define a function grade(sample, item)")
    except BaseException as e:
        for i in range(len(pairs)):
            emit({"i": i, "error": "grader source failed: " + describe(e, cpu)})
        return
    for i, (sample, item) in enumerate(pairs):
        try:
            signal.setitimer(signal.ITIMER_PROF, cpu)
            try:
                value = grade(sample, item)
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError("grade() returned %s, expected a number" % type(value).__name__)
            value = float(value)
            if not math.isfinite(value):
                raise ValueError("grade() returned %r, expected a finite number" % value)
            emit({"i": i, "score": value})
        except BaseException as e:
            emit({"i": i, "error": describe(e, cpu)})


main()
'''


# ---------------------------------------------------------------------------------------- the parent


def _system_paths() -> list[str]:
    """Read-only places the child needs: shared libraries (for extension modules) and time zones."""
    candidates = ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache"]
    candidates += ["/usr/share/zoneinfo", os.path.join(sys.base_prefix, "lib")]
    return [p for p in candidates if os.path.exists(p)]


def _site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


@lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command that puts the child in fresh namespaces, or ``()`` when none works.

    Preferred: user + network + PID namespaces (no root needed). The PID namespace matters because a
    grader that forks and calls ``setsid`` would escape a process-group kill; when the namespace's first
    process exits, the kernel kills every process left inside it.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for flags in (("-rnp", "--fork", "--kill-child"), ("-rn",), ("-np", "--fork", "--kill-child"), ("-n",)):
        try:
            ok = subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return (unshare, *flags)
    return ()


def _limit_resources(limits: Limits, n_pairs: int) -> None:
    """Runs in the child between fork and exec (``preexec_fn``): only async-signal-safe-ish calls."""
    cpu = math.ceil(limits.cpu_seconds * n_pairs + STARTUP_SECONDS)
    mem = int(limits.memory_mb) * 1024 * 1024
    for kind, value in (
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_AS, mem),
        (resource.RLIMIT_NOFILE, int(limits.open_files)),
        (resource.RLIMIT_FSIZE, int(limits.file_size_mb) * 1024 * 1024),
        # No fork for an unprivileged user (this user already has a process: this one). Root is exempt;
        # there the audit hook refuses fork and the PID namespace reaps anything that slips through.
        (resource.RLIMIT_NPROC, 1),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(kind, (value, value))


def _command() -> list[str]:
    return [*namespace_prefix(), sys.executable, "-I", "-S", "-B", "-c", _CHILD]


def _feed(stream: Any, data: bytes) -> None:
    try:
        stream.write(data)
        stream.close()
    except (BrokenPipeError, OSError):
        pass  # the child died before reading everything; its exit status tells why


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: this is its group only
    except (ProcessLookupError, PermissionError):
        pass


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "the grader process did not exit"
    if code < 0:
        sig = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        if sig in ("SIGXCPU",):
            return "the grader process ran out of CPU time (SIGXCPU)"
        return f"the grader process was killed by {sig}"
    return f"the grader process exited with status {code}"


def _run_once(source: str, pairs: list[tuple[Any, Any]], limits: Limits, layers: tuple[bool, bool]) -> _Run:
    """One child process over ``pairs``; stops at the first pair it cannot finish (timeout or crash)."""
    payload = json.dumps(
        {
            "source": source,
            "pairs": pairs,
            "cpu_seconds": float(limits.cpu_seconds),
            "site_dirs": _site_dirs() if limits.site_packages else [],
            "system_paths": _system_paths(),
            "rw_files": [os.devnull],
            "landlock": layers[0],
            "audit_hook": layers[1],
        },
        default=str,
    ).encode()
    env = {"LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = _Run()
    with tempfile.TemporaryDirectory(prefix="tuneforge-grader-", ignore_cleanup_errors=True) as workdir:
        proc = subprocess.Popen(
            _command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env,
            close_fds=True,
            start_new_session=True,
            preexec_fn=lambda: _limit_resources(limits, len(pairs)),
        )
        feeder = threading.Thread(target=_feed, args=(proc.stdin, payload), daemon=True)
        feeder.start()
        stdout, stderr = bytearray(), bytearray()
        sel = selectors.DefaultSelector()
        assert proc.stdout is not None and proc.stderr is not None
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        deadline = time.monotonic() + STARTUP_SECONDS + limits.wall_seconds
        try:
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    what = (
                        f"wall-clock limit of {limits.wall_seconds:g}s exceeded"
                        if run.ready
                        else (f"the grader process did not start within {STARTUP_SECONDS + limits.wall_seconds:g}s")
                    )
                    run.failure = what
                    _kill(proc)
                    break
                for key, _ in sel.select(timeout=remaining):
                    chunk = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.data == "err":
                        stderr += chunk
                        del stderr[: max(0, len(stderr) - STDERR_KEEP)]
                    else:
                        stdout += chunk
                        if len(stdout) > RESULT_LINE_MAX:
                            run.failure = "the grader flooded the result channel"
                            stdout.clear()
                            _kill(proc)
                            break
                        *lines, rest = stdout.split(b"\n")
                        stdout = bytearray(rest)
                        for line in lines:
                            if _take(line, run, len(pairs)):
                                deadline = time.monotonic() + limits.wall_seconds
        finally:
            sel.close()
            _kill(proc)
            proc.wait()
            feeder.join(timeout=5)
            for stream in (proc.stdout, proc.stderr):
                stream.close()
    run.stderr = stderr.decode("utf-8", "replace")
    if run.failure is None and len(run.results) < len(pairs):
        run.failure = _exit_reason(proc.returncode)
        if run.stderr.strip():
            run.failure += ": " + run.stderr.strip().splitlines()[-1][:300]
    return run


def _take(line: bytes, run: _Run, n: int) -> bool:
    """Record one line from the child; True when it was progress (ready, or a result)."""
    try:
        msg = json.loads(line)
    except ValueError:
        return False  # not ours: a grader writing to the result descriptor only garbles its own output
    if not isinstance(msg, dict):
        return False
    if msg.get("ready") is True and not run.ready:
        run.ready = True
        run.layers = dict(msg.get("layers") or {})
        return True
    i = msg.get("i")
    if not isinstance(i, int) or not 0 <= i < n or i in run.results:
        return False
    score = msg.get("score")
    if isinstance(score, (int, float)) and not isinstance(score, bool) and "error" not in msg:
        run.results[i] = Outcome(float(score))
    else:
        run.results[i] = Outcome(None, str(msg.get("error") or "no score"))
    return True


def _grade_chunk(
    source: str, pairs: list[tuple[Any, Any]], limits: Limits, switches: tuple[bool, bool]
) -> tuple[list[Outcome], dict[str, Any]]:
    """Grade every pair, starting a fresh child after each timeout or crash; each costs only its pair."""
    outcomes: list[Outcome | None] = [None] * len(pairs)
    layers: dict[str, Any] = {}
    start = 0
    while start < len(pairs):
        run = _run_once(source, pairs[start:], limits, switches)
        layers = layers or run.layers
        for i, outcome in run.results.items():
            if outcome.error is not None:
                outcome.output = run.stderr[-2000:]
            outcomes[start + i] = outcome
        missing = [i for i in range(len(pairs) - start) if i not in run.results]
        if not missing:
            break
        culprit = missing[0]
        outcomes[start + culprit] = Outcome(None, run.failure or "the grader process stopped", run.stderr[-2000:])
        if not run.ready:  # it never started: a fresh child would fail the same way, so fail them all
            for i in missing[1:]:
                outcomes[start + i] = Outcome(None, run.failure or "the grader process did not start")
            break
        start += culprit + 1
    return [o if o is not None else Outcome(None, "not graded") for o in outcomes], layers


_layers_seen: dict[str, Any] = {}


def run_graders(
    source: str,
    pairs: list[tuple[Any, Any]],
    limits: Limits | None = None,
    *,
    landlock: bool = True,
    audit_hook: bool = True,
) -> list[Outcome]:
    """Grade ``(sample, item)`` pairs with ``source``'s ``grade`` function in sandboxed child processes.

    Never raises for anything the grader does: each pair gets a score or an error. Turning ``landlock``
    or ``audit_hook`` off exists only so tests can check that each layer holds on its own.
    """
    limits = limits or Limits()
    if not pairs:
        return []
    # Split for parallel workers only when each child gets enough pairs to repay its ~50 ms start.
    size = max(1, min(limits.batch_size, max(MIN_CHUNK, math.ceil(len(pairs) / limits.workers))))
    chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
    with ThreadPoolExecutor(max_workers=min(limits.workers, len(chunks))) as pool:
        done = list(pool.map(lambda c: _grade_chunk(source, c, limits, (landlock, audit_hook)), chunks))
    outcomes = [o for chunk_outcomes, _ in done for o in chunk_outcomes]
    layers = next((lay for _, lay in done if lay), {})
    if layers and not _layers_seen:
        _layers_seen.update(layers)
        log.info("python grader sandbox: %s", describe_layers(layers))
    return outcomes


def describe_layers(layers: dict[str, Any] | None = None) -> str:
    """One line saying which isolation layers are active, e.g. for ``tuneforge grader run``."""
    layers = layers if layers is not None else _layers_seen
    ns = namespace_prefix()
    parts = ["separate isolated interpreter with empty environment", "rlimits (cpu, memory, files, processes)"]
    if ns:
        kinds = {"-rnp": "user, network, PID", "-rn": "user, network", "-np": "network, PID"}.get(ns[1], "network")
        parts.append(f"{kinds} namespaces ({' '.join([os.path.basename(ns[0]), *ns[1:]])})")
    else:
        parts.append("no namespaces (unshare unavailable or not permitted)")
    ll = layers.get("landlock")
    if isinstance(ll, int) and ll > 0:
        parts.append(f"Landlock ABI {ll} (filesystem{', TCP' if ll >= 4 else ''}{', signals' if ll >= 6 else ''})")
    elif ll is not None:
        parts.append(f"no Landlock ({ll})")
    if layers.get("audit_hook"):
        parts.append("audit hook")
    return "; ".join(parts)


def probe_layers() -> dict[str, Any]:
    """Start one sandbox with a trivial grader and report the layers that came up."""
    run = _run_once("def grade(sample, item):\n    return 1.0\n", [({}, {})], Limits(), (True, True))
    _layers_seen.update(run.layers)
    return {**run.layers, "namespaces": " ".join(namespace_prefix()) or None}
