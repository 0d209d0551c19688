"""p50 and p99 from submit to the `started` event, one warm worker, a trivial method, against a
bare Celery task round trip (send to start) on the same Redis.

A first job warms the worker up (its zygote imports the training stack), as the bare worker
gets a warm-up task. Each job then runs in a process forked for it; 200 jobs by default.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import environment, percentile, report, sft_params, write_method

TRIVIAL = '''"""A method that fails at once: dispatch is all this measures."""
raise SystemExit("trivial")
'''


def ours(ctx: dict, jobs: int) -> list[float]:
    from deepe_tasks import EventKind, submit

    write_method(ctx, "trivial", TRIVIAL)
    submit("trivial", sft_params(ctx)).wait(timeout=120)  # warm up: the zygote imports the stack
    latencies = []
    for _ in range(jobs):
        t0 = time.time()
        job = submit("trivial", sft_params(ctx))
        started = next(e for e in job.events(follow=True) if e.kind is EventKind.STARTED)
        latencies.append(started.ts - t0)
        job.wait(timeout=120)
    return latencies


def bare(ctx: dict, jobs: int) -> list[float]:
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(here)}
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bare_app", "worker", "-Q", "bare",
                               "--concurrency", "1", "--pool", "prefork", "--loglevel", "WARNING"],
                              cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sys.path.insert(0, str(here))
        from bare_app import app, started

        app.control.ping(timeout=10)
        time.sleep(2)
        started.apply_async(queue="bare").get(timeout=60)  # warm up
        latencies = []
        for _ in range(jobs):
            t0 = time.time()
            latencies.append(started.apply_async(queue="bare").get(timeout=60) - t0)
        return latencies
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    jobs = parser.parse_args().jobs
    with environment(workers=1) as ctx:
        mine = ours(ctx, jobs)
        theirs = bare(ctx, jobs)
        p50, p50_bare = percentile(mine, 50), percentile(theirs, 50)
        report("dispatch", {
            "ours_p50_ms": round(p50 * 1000, 1), "ours_p99_ms": round(percentile(mine, 99) * 1000, 1),
            "baseline_p50_ms": round(p50_bare * 1000, 1), "baseline_p99_ms": round(percentile(theirs, 99) * 1000, 1),
            "ratio_p50": round(p50 / p50_bare, 2), "goal": "p50 ratio <= 3", "jobs": jobs,
        })


if __name__ == "__main__":
    main()
