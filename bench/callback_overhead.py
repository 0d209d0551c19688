"""Median training step time with our callback publishing every step (through a real Redis,
with the cancel check), against the same trainer with no callback.

A step is timed from its begin to the next step's begin, so it includes the logging and every
callback; the two runs alternate, ROUNDS times each, so that drift on a shared machine hits
both alike.
"""

from __future__ import annotations

import time
from typing import Any

from common import environment, median, report, sft_params

STEPS = 60
ROUNDS = 4


def step_times(ctx: dict[str, Any], with_callback: bool) -> list[float]:
    import redis
    from transformers import TrainerCallback

    from deepe_tasks.callback import DeepeCallback
    from deepe_tasks.events import EventPublisher
    from deepe_tasks.jobproc import StopFlags
    from deepe_tasks.local import local_runner
    from deepe_tasks.records import JobSpec

    client = redis.Redis.from_url(ctx["url"], decode_responses=True)
    publisher = EventPublisher(client, "bench-callback")
    runner = local_runner(ctx["work"] / "methods" / "sft-demo.py",
                          sft_params(ctx, MAX_STEPS=STEPS, OUTPUT_DIR="models/bench"), publisher.emit)
    spec: JobSpec = runner.spec
    runner.callback.should_stop = StopFlags(client, spec).check
    trainer = runner.build()
    if not with_callback:
        trainer.remove_callback(DeepeCallback)
    times: list[float] = []

    class Timer(TrainerCallback):
        """Step begin to the next step's begin: the step, and every callback and log after it."""

        last: float | None = None

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            now = time.perf_counter()
            if self.last is not None:
                times.append(now - self.last)
            self.last = now

    trainer.add_callback(Timer())
    trainer.train()
    publisher.close()
    return times[5:]  # the first steps warm caches


def main() -> None:
    with environment() as ctx:
        ours: list[float] = []
        bare: list[float] = []
        for _ in range(ROUNDS):
            ours += step_times(ctx, with_callback=True)
            bare += step_times(ctx, with_callback=False)
        report("callback_overhead", {
            "ours_median_step_s": round(median(ours), 6), "baseline_median_step_s": round(median(bare), 6),
            "ratio": round(median(ours) / median(bare), 4), "goal": "<= 1.02", "steps": len(ours),
            "device": "cpu",
        })


if __name__ == "__main__":
    main()
