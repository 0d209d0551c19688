"""Median training step time with our callback publishing every step (through a real Redis,
with the cancel check), against the same trainer without it.

Whole runs of a tiny model on a shared 2-core machine differ from each other by several per
cent, more than the effect measured here. So one run does both: our callback is switched on
and off in blocks of BLOCK steps (the first SKIP steps of each block are left out, so that
publishing never spills into the other kind), and ROUNDS runs repeat it. A step is timed
from its begin to the next step's begin: the step, the logging and every callback.

Even so, on this machine the ratio moves by a few per cent from run to run, so the script
also measures the cost itself: the CPU time our callback's hooks take on the training thread,
plus the CPU time of the publisher's thread, per step (`callback_cpu_us_per_step`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from common import environment, median, report, running_job, sft_params, smoke_flag

STEPS = 400
BLOCK = 10
SKIP = 2
ROUNDS = 2
CPU_STEPS = 400
SMOKE_STEPS, SMOKE_ROUNDS, SMOKE_CPU_STEPS = 40, 1, 20


def step_times(ctx: dict[str, Any], job_id: str, steps: int) -> tuple[list[float], list[float]]:
    """One run of ``steps`` steps as job ``job_id`` (a new id each run: an id is used once)."""
    import redis
    from transformers import TrainerCallback

    from deepe_tasks.core.events import EventPublisher
    from deepe_tasks.job.callback import DeepeCallback
    from deepe_tasks.job.stops import StopFlags
    from deepe_tasks.ui.local import local_runner

    client = redis.Redis.from_url(ctx["url"], decode_responses=True)
    publisher = EventPublisher(client, job_id, running_job(client, job_id))
    runner = local_runner(ctx["work"] / "methods" / "sft-demo.py",
                          sft_params(ctx, MAX_STEPS=steps, OUTPUT_DIR=f"models/{job_id}"), publisher.emit)
    ours = runner.callback
    ours.should_stop = StopFlags(client, runner.spec).check
    trainer = runner.build()
    trainer.remove_callback(DeepeCallback)

    class Switched(TrainerCallback):
        """Our callback while ``on``; nothing at all while off."""

        on = True

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            ours.on_train_begin(*a, **k)

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if self.on:
                ours.on_step_end(*a, **k)

        def on_log(self, *a: Any, **k: Any) -> None:
            if self.on:
                ours.on_log(*a, **k)

        def on_save(self, *a: Any, **k: Any) -> None:
            if self.on:
                ours.on_save(*a, **k)

    switched = Switched()
    with_cb: list[float] = []
    without: list[float] = []

    class Timer(TrainerCallback):
        last: float | None = None
        step = 0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            now = time.perf_counter()
            if self.last is not None and (self.step - 1) % BLOCK >= SKIP:
                (with_cb if switched.on else without).append(now - self.last)
            self.last = now
            switched.on = (self.step // BLOCK) % 2 == 0
            self.step += 1

    trainer.add_callback(switched)
    trainer.add_callback(Timer())
    trainer.train()
    publisher.close()
    return with_cb, without


def thread_cpu_s(native_id: int) -> float:
    """A thread's CPU time, to the nanosecond (schedstat's first field)."""
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0]) / 1e9


def callback_cpu_per_step(ctx: dict[str, Any], steps: int = 400, step_s: float = 0.02) -> float:
    """CPU seconds per step of our hooks (on the calling thread) and the publisher's thread, with
    one `log` event a step through the real Redis and steps ``step_s`` apart."""
    import redis
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from deepe_tasks.core.events import EventPublisher
    from deepe_tasks.core.records import JobSpec
    from deepe_tasks.job.callback import DeepeCallback
    from deepe_tasks.job.stops import StopFlags

    client = redis.Redis.from_url(ctx["url"], decode_responses=True)
    publisher = EventPublisher(client, "bench-cpu", running_job(client, "bench-cpu"))
    spec = JobSpec(job_id="bench-cpu", method="bench", method_sha256="", source="", params={},
                   storage_root=str(ctx["work"]))
    callback = DeepeCallback("bench-cpu", publisher.emit, StopFlags(client, spec).check, 15)
    args = TrainingArguments(output_dir=str(ctx["work"] / "cpu"), report_to="none", use_cpu=True)
    state, control = TrainerState(max_steps=steps), TrainerControl()
    logs = {"loss": 2.3456, "grad_norm": 0.7712, "learning_rate": 1e-4, "epoch": 0.5, "entropy": 4.21,
            "num_tokens": 1000.0, "mean_token_accuracy": 0.31}
    callback.on_train_begin(args, state, control)
    native_id = publisher._thread.native_id or 0
    hooks = 0.0
    thread_before = thread_cpu_s(native_id)
    for step in range(1, steps + 1):
        state.global_step = step
        t0 = time.thread_time()
        callback.on_step_end(args, state, control)
        callback.on_log(args, state, control, logs=dict(logs))
        hooks += time.thread_time() - t0
        time.sleep(step_s)
    publisher.flush()
    total = hooks + thread_cpu_s(native_id) - thread_before
    publisher.close()
    return total / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    smoke_flag(parser, f"{SMOKE_ROUNDS} run of {SMOKE_STEPS} steps, {SMOKE_CPU_STEPS} steps of the direct measure")
    smoke = parser.parse_args().smoke
    steps, runs, cpu_steps = (SMOKE_STEPS, SMOKE_ROUNDS, SMOKE_CPU_STEPS) if smoke else (STEPS, ROUNDS, CPU_STEPS)
    with environment() as ctx:
        ours: list[float] = []
        bare: list[float] = []
        rounds = []
        for n in range(runs):
            mine, theirs = step_times(ctx, f"bench-callback-{n}", steps)
            ours += mine
            bare += theirs
            rounds.append(round(median(mine) / median(theirs), 4))
        cpu = callback_cpu_per_step(ctx, cpu_steps)
        report("callback_overhead", {
            "ours_median_step_s": round(median(ours), 6), "baseline_median_step_s": round(median(bare), 6),
            "ratio": round(median(ours) / median(bare), 4), "goal": "<= 1.02", "ratio_each_round": rounds,
            "steps": len(ours) + len(bare), "callback_cpu_us_per_step": round(cpu * 1e6, 1),
            "callback_cpu_share_of_step": round(cpu / median(bare), 5), "device": "cpu",
        }, smoke=smoke)


if __name__ == "__main__":
    main()
