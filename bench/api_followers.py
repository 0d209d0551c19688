"""`/healthz` latency of a real `deepe api` with N idle SSE followers open, against none.

Each follower is a raw socket on `GET /jobs/{id}/events` of a queued job that never runs: it
gets the replayed `queued` event, then only a keepalive every 15 s. The requests are paced over
20 s, so that they meet the followers' keepalives. The baseline is the same measurement with
no follower, in the same run, on the same server.

    .venv/bin/python bench/api_followers.py              # 200 followers
    .venv/bin/python bench/api_followers.py --smoke      # 20 followers, fewer requests
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import environment, percentile, report

TOKEN = "bench-api-token"
PACE = 0.1  # s between requests: 200 of them span 20 s, past the followers' keepalives (every 15 s)
GOAL_MS = 100.0  # p99 of /healthz with 200 idle followers


def start_api(ctx: dict[str, Any], followers: int) -> tuple[subprocess.Popen[bytes], int]:
    import httpx

    from deepe_tasks.fixtures.embedded import free_port

    port = free_port()
    env = {**os.environ, "DEEPE_API_TOKENS": TOKEN, "DEEPE_API_MAX_STREAMS_PER_TOKEN": str(followers + 10)}
    proc = subprocess.Popen([sys.executable, "-m", "deepe_tasks", "api", "--port", str(port)], env=env,
                            stdout=(ctx["work"] / "api.log").open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the API did not start; see {ctx['work'] / 'api.log'}")


def quiet_job(url: str) -> str:
    import redis

    from deepe_tasks.core import jobstore
    from deepe_tasks.core.records import Event, EventKind, JobRecord

    client = redis.Redis.from_url(url, decode_responses=True)
    record = JobRecord(id="bench-quiet", method="m", method_sha256="0", params={}, output_dir="/o", queue="nobody")
    jobstore.create(client, record, "", Event(kind=EventKind.QUEUED, job=record.id))
    return record.id


def follower(port: int, job_id: str) -> socket.socket:
    """An open event stream that has had its first event: idle from here on."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    seen = b""
    while b"event: queued" not in seen:
        chunk = sock.recv(4096)
        if not chunk:
            raise SystemExit(f"a follower was refused: {seen[:300]!r}")
        seen += chunk
    return sock


def healthz_latency(port: int, requests: int, pace: float = 0.0) -> dict[str, float]:
    """p50 and p99 of `GET /healthz` over a keep-alive connection, in ms, one request every
    ``pace`` seconds."""
    import httpx

    times = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        for _ in range(requests):
            t0 = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            times.append((time.perf_counter() - t0) * 1000)
            time.sleep(max(0.0, pace - (time.perf_counter() - t0)))
    return {"p50_ms": round(percentile(times, 50), 2), "p99_ms": round(percentile(times, 99), 2),
            "max_ms": round(max(times), 2)}


def proc_status(pid: int, field: str) -> int:
    """A number of /proc/PID/status (Threads; VmRSS in kB)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--followers", type=int, default=200)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="20 followers, 50 requests")
    args = parser.parse_args()
    followers, requests = (20, 50) if args.smoke else (args.followers, args.requests)
    with environment() as ctx:
        proc, port = start_api(ctx, followers)
        try:
            job_id = quiet_job(ctx["url"])
            healthz_latency(port, 20)  # warm up
            baseline = healthz_latency(port, requests, PACE)
            threads_before = proc_status(proc.pid, "Threads")
            t0 = time.perf_counter()
            streams = [follower(port, job_id) for _ in range(followers)]
            opened_s = time.perf_counter() - t0
            time.sleep(2)  # every follower now waits in its blocking read
            ours = healthz_latency(port, requests, PACE)
            figures = {
                "followers": followers, "requests": requests,
                "healthz_with_followers": ours, "healthz_baseline_no_followers": baseline,
                "p99_ratio": round(ours["p99_ms"] / baseline["p99_ms"], 2),
                "goal": f"p99 < {GOAL_MS:.0f} ms with 200 idle followers", "met": ours["p99_ms"] < GOAL_MS,
                "open_followers_s": round(opened_s, 2),
                "server_threads": {"before": threads_before, "with_followers": proc_status(proc.pid, "Threads")},
                "server_rss_mb": round(proc_status(proc.pid, "VmRSS") / 1024, 1),
            }
            for sock in streams:
                sock.close()
            report("api_followers", figures, smoke=args.smoke)
        finally:
            proc.terminate()
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
