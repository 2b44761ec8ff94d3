"""Load and start-up overhead of the jobs service, loopback only, bounded (a minute or two on a laptop CPU).

1. 200 concurrent requests against a real ``tuneforge server`` — list files, retrieve a file, upload a file, list a
   job's events — reporting errors and p50 / p99 latency.
2. Job start overhead: the time from ``POST /v1/fine_tuning/jobs`` to the job's first training step (its first
   ``metrics.jsonl`` row) against the same recipe run directly with ``tuneforge train``, interleaved
   (service, direct, service, direct …) and compared by median.

    python benchmarks/service_load.py [--requests 200] [--repeats 2]

The last line is JSON: ``{"requests", "errors", "p50_ms", "p99_ms", "job_start_overhead_s", …}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

WORDS = [
    "apple",
    "banana",
    "cherry",
    "delta",
    "echo",
    "fox",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mango",
    "nova",
    "oscar",
    "papa",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(n: int) -> str:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        w = rng.sample(WORDS, 3)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": "reverse: " + " ".join(w)},
                    {"role": "assistant", "content": " ".join(reversed(w))},
                ]
            }
        )
    return "".join(json.dumps(r) + "\n" for r in out)


def first_step_seconds(metrics: Path, t0: float, timeout: float = 300) -> float:
    """Seconds from `t0` until `metrics` holds its first complete row."""
    while time.perf_counter() - t0 < timeout:
        if metrics.exists() and b"\n" in metrics.read_bytes():
            return time.perf_counter() - t0
        time.sleep(0.02)
    raise TimeoutError(f"no training step in {metrics} after {timeout}s")


async def load(url: str, key: str, file_id: str, job_id: str, n: int) -> tuple[list[float], int]:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as client:

        async def one(i: int) -> tuple[float, bool]:
            t0 = time.perf_counter()
            kind = i % 4
            if kind == 0:
                r = await client.get("/files")
            elif kind == 1:
                r = await client.get(f"/files/{file_id}")
            elif kind == 2:
                r = await client.post("/files", files={"file": (f"f{i}.jsonl", b"{}\n")}, data={"purpose": "fine-tune"})
            else:
                r = await client.get(f"/fine_tuning/jobs/{job_id}/events")
            return (time.perf_counter() - t0) * 1000, r.status_code == 200

        results = await asyncio.gather(*(one(i) for i in range(n)))
    return [ms for ms, _ in results], sum(not ok for _, ok in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="tuneforge-bench-"))
    env = {**os.environ, "TUNEFORGE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    os.environ.update(env)
    from tuneforge.models.tiny import TinySpec, build_tiny

    texts = [m["content"] for line in records(300).splitlines() for m in json.loads(line)["messages"]]
    model = build_tiny(
        home / "tiny",
        texts,
        vocab_size=320,
        spec=TinySpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176),
    )
    subprocess.run([sys.executable, "-m", "tuneforge", "models", "add", "tiny", str(model)], env=env, check=True)
    key = subprocess.run(
        [sys.executable, "-m", "tuneforge", "keys", "create", "--project", "bench"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "server", "--port", str(port), "--no-tracking", "--slots", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    pids: list[int] = []
    try:
        for _ in range(600):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        headers = {"Authorization": f"Bearer {key}"}
        data = records(64).encode()
        file_id = httpx.post(
            f"{url}/files", headers=headers, files={"file": ("train.jsonl", data)}, data={"purpose": "fine-tune"}
        ).json()["id"]
        body = {
            "model": "tiny",
            "training_file": file_id,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}},
            "tuneforge": {"overrides": {"train.log_every": 1, "train.max_steps": 2}},
        }

        service_s, direct_s = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            job = httpx.post(f"{url}/fine_tuning/jobs", headers=headers, json=body).json()
            run_dir = home / "service" / "jobs" / job["id"] / "run"
            service_s.append(first_step_seconds(run_dir / "metrics.jsonl", t0))
            while httpx.get(f"{url}/fine_tuning/jobs/{job['id']}", headers=headers).json()["status"] == "running":
                time.sleep(0.2)
            recipe = run_dir.parent / "recipe.yaml"
            direct_dir = home / f"direct-{len(direct_s)}"
            t0 = time.perf_counter()
            direct = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tuneforge",
                    "train",
                    str(recipe),
                    "--quiet",
                    "--set",
                    f"output.dir={direct_dir}",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
            )
            pids.append(direct.pid)
            direct_s.append(first_step_seconds(direct_dir / "metrics.jsonl", t0))
            direct.wait(timeout=300)
        last_job = job["id"]

        latencies, errors = asyncio.run(load(url, key, file_id, last_job, args.requests))
        q = statistics.quantiles(latencies, n=100)
        overheads = [a - b for a, b in zip(service_s, direct_s)]
        print(json.dumps({"service_first_step_s": service_s, "direct_first_step_s": direct_s}))
        print(
            json.dumps(
                {
                    "requests": len(latencies),
                    "errors": errors,
                    "p50_ms": round(statistics.median(latencies), 2),
                    "p99_ms": round(q[98], 2),
                    "job_start_overhead_s": round(statistics.median(overheads), 3),
                    "job_start_overhead_spread_s": round(max(overheads) - min(overheads), 3),
                    "job_start_ratio": round(statistics.median(a / b for a, b in zip(service_s, direct_s)), 3),
                }
            )
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        for pid_file in (home / "service" / "jobs").glob("*/attempt-*.pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
