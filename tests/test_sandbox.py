"""The python-grader sandbox: hostile graders are stopped and score 0 with an error; good ones score.

Each hostile behaviour is checked with all layers on, and the strongest layers (Landlock, namespaces)
are also checked alone — with the audit hook off — where this kernel offers them.
"""

from __future__ import annotations

import socket
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tuneforge.rewards.sandbox import Limits, describe_layers, namespace_prefix, probe_layers, run_graders

REPO_FILE = Path(__file__).resolve()  # a file of the project the grader must not read
FAST = Limits(cpu_seconds=1.0, wall_seconds=3.0, memory_mb=512)


def grade_one(source: str, item: dict | None = None, limits: Limits = FAST, **switches: bool):
    [outcome] = run_graders(textwrap.dedent(source), [({"output_text": "x"}, item or {})], limits, **switches)
    return outcome


@pytest.fixture(scope="module")
def layers() -> dict:
    return probe_layers()


def needs_landlock(layers: dict) -> None:
    if not (isinstance(layers.get("landlock"), int) and layers["landlock"] >= 1):
        pytest.skip(f"Landlock not available here: {layers.get('landlock')}")


def test_good_grader_scores_each_pair_in_order():
    source = """
    def grade(sample, item):
        return 1.0 if sample["output_text"].strip() == str(item["answer"]) else 0.0
    """
    pairs = [({"output_text": f" {i % 3} "}, {"answer": i % 2}) for i in range(300)]
    outcomes = run_graders(textwrap.dedent(source), pairs, FAST)
    assert [o.error for o in outcomes] == [None] * 300
    assert [o.score for o in outcomes] == [float(i % 3 == i % 2) for i in range(300)]


def test_workers_split_a_large_batch_without_reordering():
    source = "def grade(sample, item):\n    return item['i'] * 2\n"
    pairs = [({}, {"i": i}) for i in range(200)]
    outcomes = run_graders(source, pairs, Limits(workers=2))
    assert [o.score for o in outcomes] == [2.0 * i for i in range(200)]


@pytest.mark.parametrize("target", ["/etc/passwd", str(REPO_FILE)])
def test_reading_outside_the_working_directory_is_refused(target):
    outcome = grade_one(f"def grade(sample, item):\n    return len(open({target!r}).read())\n")
    assert outcome.score is None
    assert "not allowed" in outcome.error and target in outcome.error


def test_working_directory_is_usable_and_outside_writes_are_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    source = f"""
    def grade(sample, item):
        if item["where"] == "inside":
            with open("scratch.txt", "w") as f:
                f.write("12345")
            return len(open("scratch.txt").read())
        open({str(victim)!r}, "w").write("overwritten")
        return 1.0
    """
    pairs = [({}, {"where": "inside"}), ({}, {"where": "outside"})]
    inside, outside = run_graders(textwrap.dedent(source), pairs, FAST)
    assert inside.score == 5.0 and inside.error is None
    assert outside.score is None and "writing" in outside.error
    assert victim.read_text() == "original"


def test_sockets_are_refused():
    outcome = grade_one(
        """
        import socket
        def grade(sample, item):
            socket.create_connection(("127.0.0.1", 9), timeout=1)
            return 1.0
        """
    )
    assert outcome.score is None and "socket" in outcome.error


def test_processes_and_ctypes_are_refused():
    source = """
    import os, subprocess
    def grade(sample, item):
        how = item["how"]
        if how == "subprocess":
            return float(subprocess.run(["true"]).returncode)
        if how == "system":
            return float(os.system("true"))
        if how == "fork":
            return float(os.fork() >= 0)
        import ctypes
        return 1.0
    """
    hows = ["subprocess", "system", "fork", "ctypes"]
    outcomes = run_graders(textwrap.dedent(source), [({}, {"how": h}) for h in hows], FAST)
    assert all(o.score is None and "not allowed" in o.error for o in outcomes), outcomes


def test_site_packages_are_opt_in_and_read_only():
    pytest.importorskip("numpy")
    source = "import numpy as np\ndef grade(sample, item):\n    return float(np.mean(item['x']))\n"
    [without] = run_graders(source, [({}, {"x": [1, 2, 3]})], FAST)
    assert without.score is None and "No module named 'numpy'" in without.error
    [with_numpy] = run_graders(source, [({}, {"x": [1, 2, 3]})], Limits(site_packages=True))
    assert with_numpy.error is None and with_numpy.score == 2.0


def test_environment_secrets_are_invisible(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-do-not-leak")
    source = """
    import os
    def grade(sample, item):
        leaked = any("sk-test-secret" in v for v in os.environ.values()) or "OPENAI_API_KEY" in os.environ
        return 1.0 if leaked else 0.0
    """
    outcome = grade_one(source)
    assert outcome.error is None and outcome.score == 0.0
    parent = grade_one(
        "import os\ndef grade(s, i):\n    return len(open('/proc/%d/environ' % os.getppid(), 'rb').read())\n"
    )
    assert parent.score is None


@pytest.mark.timeout(60)  # a hang guard; the behaviour is asserted below
def test_infinite_loop_hits_the_cpu_limit_and_the_batch_goes_on():
    source = """
    calls = []
    def grade(sample, item):
        calls.append(1)
        if item["loop"]:
            while True:
                pass
        return 0.5 * len(calls)
    """
    looping, fine = run_graders(
        textwrap.dedent(source), [({}, {"loop": True}), ({}, {"loop": False})], Limits(cpu_seconds=0.5)
    )
    assert looping.score is None and looping.error == "CPU time limit of 0.5s exceeded"  # the child's own timer
    assert fine.score == 1.0  # 0.5 * 2 calls: the same child went on to the next pair after the interrupted loop


@pytest.mark.timeout(60)  # a hang guard; the behaviour is asserted below
def test_wall_clock_limit_kills_a_sleeping_grader_and_a_fresh_child_grades_the_rest():
    source = """
    import time
    calls = []
    def grade(sample, item):
        calls.append(1)
        if item["sleep"]:
            time.sleep(600)
        return 0.25 * len(calls)
    """
    pairs = [({}, {"sleep": False}), ({}, {"sleep": True}), ({}, {"sleep": False})]
    before, sleeping, after = run_graders(textwrap.dedent(source), pairs, Limits(wall_seconds=1.0))
    assert sleeping.score is None and sleeping.error == "wall-clock limit of 1s exceeded"
    # the sleeper's process was killed: the last pair ran in a fresh child (its first call), not after a wake-up
    assert (before.score, after.score) == (0.25, 0.25)


def test_too_much_memory_is_an_error():
    outcome = grade_one(
        "def grade(sample, item):\n    return len(bytearray(2 * 1024**3))\n", limits=Limits(memory_mb=256)
    )
    assert outcome.score is None and "MemoryError" in outcome.error


@pytest.mark.parametrize(
    "body, expected",
    [
        ("import os\n    os._exit(3)", "status 3"),
        (
            "import sys\n    sys.setrecursionlimit(10**8)\n    x = []\n    for _ in range(200000): x = [x]\n    repr(x)",
            "SIGSEGV",
        ),
        ("raise ValueError('bad answer format')", "ValueError: bad answer format (grader line 3)"),
        ("return 'high'", "expected a number"),
        ("return float('nan')", "finite"),
    ],
)
def test_crashes_and_bad_returns_cost_one_pair(body, expected):
    source = f"def grade(sample, item):\n  if item['bad']:\n    {body}\n  return 1.0\n"
    pairs = [({}, {"bad": False}), ({}, {"bad": True}), ({}, {"bad": False})]
    ok1, bad, ok2 = run_graders(source, pairs, Limits(cpu_seconds=10, wall_seconds=20))
    assert (ok1.score, ok2.score) == (1.0, 1.0)
    assert bad.score is None and expected in bad.error


def test_source_failing_at_import_fails_every_pair():
    outcomes = run_graders("import does_not_exist_anywhere\ndef grade(s, i):\n    return 1\n", [({}, {})] * 3, FAST)
    assert all(o.score is None and "grader source failed: ModuleNotFoundError" in o.error for o in outcomes)


def test_grader_output_does_not_corrupt_results():
    source = "import sys, os\ndef grade(s, i):\n    print('{\"i\": 0, \"score\": 99}')\n    os.write(1, b'noise\\n')\n    return 0.5\n"
    outcomes = run_graders(source, [({}, {})] * 3, FAST)
    assert [o.score for o in outcomes] == [0.5, 0.5, 0.5]


def test_standard_library_imports_work_inside_the_sandbox():
    source = """
    import json, re, math, fractions, collections, difflib, hashlib, datetime
    def grade(sample, item):
        data = json.loads(sample["output_text"])
        return float(fractions.Fraction(data["n"], 4)) + len(hashlib.sha256(b"x").hexdigest()) * 0
    """
    [outcome] = run_graders(textwrap.dedent(source), [({"output_text": '{"n": 3}'}, {})], FAST)
    assert outcome.error is None and outcome.score == 0.75


# ------------------------------------------------------------------------------ each layer on its own


def test_landlock_alone_blocks_files_and_exec(layers, tmp_path):
    needs_landlock(layers)
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    source = f"""
    import os
    def grade(sample, item):
        if item["k"] == "read":
            return len(open("/etc/passwd").read())
        if item["k"] == "write":
            open({str(victim)!r}, "w").write("overwritten")
            return 1.0
        os.execv("/bin/true", ["true"])
    """
    pairs = [({}, {"k": "read"}), ({}, {"k": "write"}), ({}, {"k": "exec"})]
    outcomes = run_graders(textwrap.dedent(source), pairs, FAST, audit_hook=False)
    assert all(o.score is None and "PermissionError" in o.error for o in outcomes), outcomes
    assert victim.read_text() == "original"


def test_network_namespace_alone_blocks_a_listening_local_server():
    if not namespace_prefix():
        pytest.skip("unshare is not available or not permitted here")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        source = f"""
        import socket
        def grade(sample, item):
            socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
            return 1.0
        """
        outcome = grade_one(source, landlock=False, audit_hook=False)
    assert outcome.score is None and "OSError" in outcome.error


def test_pid_namespace_leaves_no_escaped_process_behind():
    if "-rnp" not in namespace_prefix() and "-np" not in namespace_prefix():
        pytest.skip("no PID namespace here")
    marker = f"tuneforge-escape-{uuid.uuid4().hex}"
    source = f"""
    import os, sys
    def grade(sample, item):
        if os.fork() == 0:
            os.setsid()
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", {marker!r}])
        return 1.0
    """
    outcome = grade_one(source, landlock=False, audit_hook=False)
    assert outcome.score == 1.0
    time.sleep(0.3)
    survivors = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                survivors.append(int(proc.name))
        except OSError:
            continue
    assert survivors == []


def test_layers_are_reported(layers):
    text = describe_layers(layers)
    assert "empty environment" in text
    if namespace_prefix():
        assert "namespaces" in text
    if isinstance(layers.get("landlock"), int):
        assert f"Landlock ABI {layers['landlock']}" in text


def test_throughput_of_a_batched_grader():
    source = "import re\ndef grade(sample, item):\n    m = re.search(r'\\d+', sample['output_text'])\n    return float(bool(m) and m.group() == item['a'])\n"
    pairs = [({"output_text": f"answer: {i % 10}"}, {"a": str(i % 7)}) for i in range(2000)]
    start = time.perf_counter()
    outcomes = run_graders(source, pairs, Limits())
    elapsed = time.perf_counter() - start
    assert [o.score for o in outcomes] == [float(i % 10 == i % 7) for i in range(2000)]
    print(f"\n{len(pairs) / elapsed:.0f} graded samples/s ({elapsed * 1000:.0f} ms for {len(pairs)})", file=sys.stderr)
    # The throughput comes from batching: one child grades batch_size pairs in a row (its calls count up),
    # rather than a process start per pair.
    counting = "calls = []\ndef grade(sample, item):\n    calls.append(1)\n    return float(len(calls))\n"
    batch = Limits().batch_size
    assert [o.score for o in run_graders(counting, pairs, Limits())] == [float(i % batch + 1) for i in range(2000)]
