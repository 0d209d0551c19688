"""p50 and p99 from submit to the `started` event, one warm worker, a trivial method, against a
bare Celery task round trip (send to start) on the same Redis.

Both workers run side by side, and the two kinds of job alternate, so that drift on a shared
machine hits both alike. A first job warms our worker up (its zygote imports the training
stack), as the bare worker gets a warm-up task. Each of our jobs then runs in a process forked
for it and ends at once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import environment, percentile, report, sft_params, smoke_flag, write_method

# It defines the three names submit's static check asks for (contract/check.py), then fails
# before it builds anything.
TRIVIAL = '''"""A method that fails at once: dispatch is all this measures."""
model = tokenizer = trainer = None
raise SystemExit("trivial")
'''
SMOKE_JOBS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    smoke_flag(parser, f"{SMOKE_JOBS} jobs")
    args = parser.parse_args()
    jobs = SMOKE_JOBS if args.smoke else args.jobs
    with environment(workers=1) as ctx:
        from deepe_tasks import EventKind, submit

        here = Path(__file__).resolve().parent
        bare_worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bare_app", "worker", "-Q", "bare", "--concurrency", "1",
             "--pool", "prefork", "--loglevel", "WARNING"],
            cwd=here, env={**os.environ, "PYTHONPATH": str(here)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            sys.path.insert(0, str(here))
            from bare_app import app, started

            app.control.ping(timeout=10)
            started.apply_async(queue="bare").get(timeout=60)  # warm up
            write_method(ctx, "trivial", TRIVIAL)
            submit("trivial", sft_params(ctx)).wait(timeout=120)  # warm up

            mine, theirs = [], []
            for _ in range(jobs):
                t0 = time.time()
                job = submit("trivial", sft_params(ctx))
                event = next(e for e in job.events(follow=True) if e.kind is EventKind.STARTED)
                mine.append(event.ts - t0)
                job.wait(timeout=120)

                t0 = time.time()
                theirs.append(started.apply_async(queue="bare").get(timeout=60) - t0)
        finally:
            bare_worker.terminate()
            bare_worker.wait(timeout=30)

        p50, p50_bare = percentile(mine, 50), percentile(theirs, 50)
        report("dispatch", {
            "ours_p50_ms": round(p50 * 1000, 1), "ours_p99_ms": round(percentile(mine, 99) * 1000, 1),
            "baseline_p50_ms": round(p50_bare * 1000, 1), "baseline_p99_ms": round(percentile(theirs, 99) * 1000, 1),
            "ratio_p50": round(p50 / p50_bare, 2), "goal": "p50 ratio <= 3", "jobs": jobs,
        }, smoke=args.smoke)


if __name__ == "__main__":
    main()
