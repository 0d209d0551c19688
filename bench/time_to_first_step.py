"""Seconds from submit to the first `log` event on a warm worker, against the local-test
script (same method and parameters) from process start to its first step."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any

from common import environment, median, report, sft_params, smoke_flag

RUNS = 3


def ours(ctx: dict[str, Any], params: dict[str, Any]) -> float:
    from deepe_tasks import EventKind, submit

    t0 = time.time()
    job = submit("sft-demo", params)
    first = next(e for e in job.events(follow=True) if e.kind in (EventKind.LOG, EventKind.FAILED))
    assert first.kind is EventKind.LOG, first.message
    job.wait(timeout=120)
    return first.ts - t0


def baseline(ctx: dict[str, Any], params: dict[str, Any]) -> float:
    script = (ctx["work"] / "methods" / "run_local_train_test_template.py").read_text()
    script = script.replace("'your-custom-file.py'", "'sft-demo.py'")
    script = script.replace("PARAMS = {", f"PARAMS = {params!r}\n_unused = {{")
    path = ctx["work"] / "methods" / "run_local_train_test.py"
    path.write_text(script)
    errors = path.with_suffix(".stderr")
    with errors.open("w") as stderr:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-u", str(path)], stdout=subprocess.PIPE, stderr=stderr,
                                text=True, cwd=path.parent)
        assert proc.stdout is not None
        for line in proc.stdout:
            if " step 1/" in line:
                elapsed = time.monotonic() - t0
                break
        else:
            proc.wait()
            raise RuntimeError(f"the local script never reached step 1: {errors.read_text()[-2000:]}")
        proc.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    smoke_flag(parser, "1 run of each, of 1 step")
    smoke = parser.parse_args().smoke
    runs = 1 if smoke else RUNS
    with environment(workers=1) as ctx:
        params = sft_params(ctx, MAX_STEPS=1) if smoke else sft_params(ctx)
        from deepe_tasks import submit

        submit("sft-demo", params).wait(timeout=180)  # first job: the worker's zygote imports the stack
        warm, local = [], []
        for run in range(runs):  # run-local refuses an OUTPUT_DIR that holds a model: one per run
            warm.append(ours(ctx, params))
            local.append(baseline(ctx, {**params, "OUTPUT_DIR": f"models/local-{run}"}))
        report("time_to_first_step", {
            "ours_s": round(median(warm), 3), "baseline_s": round(median(local), 3),
            "ratio": round(median(warm) / median(local), 3), "goal": "<= 0.25",
            "runs": runs, "ours_all": [round(x, 3) for x in warm], "baseline_all": [round(x, 3) for x in local],
        }, smoke=smoke)


if __name__ == "__main__":
    main()
