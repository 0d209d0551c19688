"""Makespan of 16 jobs of fixed length with 1 and 2 workers, against the ideal (the 1-worker
makespan divided by the number of workers).

The jobs sleep through their steps instead of computing, so that two workers on a 2-core
machine measure the queue, not the CPU.
"""

from __future__ import annotations

import argparse
import time

from common import environment, report, sft_params, smoke_flag, write_method

JOBS = 16
STEPS, STEP_SECONDS = 4, 0.5
SMOKE_JOBS, SMOKE_STEPS, SMOKE_STEP_SECONDS = 2, 1, 0.1
FIXED = '''"""A fixed-length job: a tiny model, and steps that take STEP_SECONDS each."""
import time

from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from datasets import Dataset

tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
model = AutoModelForCausalLM.from_pretrained(MODEL_PATH)
ids = tokenizer("The sky is blue.")["input_ids"]
dataset = Dataset.from_list([{"input_ids": ids, "labels": ids}] * 8)


class FixedStep(TrainerCallback):
    def on_step_end(self, *args, **kwargs):
        time.sleep(float(params.get("STEP_SECONDS", 0.5)))


trainer = Trainer(model=model, train_dataset=dataset, callbacks=[callback, FixedStep()],
                  args=TrainingArguments(max_steps=MAX_STEPS, per_device_train_batch_size=1,
                                         logging_steps=1, report_to="none", use_cpu=True))
'''


def makespan(workers: int, n: int = JOBS, steps: int = STEPS, step_s: float = STEP_SECONDS,
             warm_s: float = 10.0) -> float:
    with environment(workers=workers) as ctx:
        from deepe_tasks import JobStatus, submit

        write_method(ctx, "fixed", FIXED)
        time.sleep(warm_s)  # every worker's zygote has imported the training stack
        t0 = time.monotonic()
        jobs = [submit("fixed", sft_params(ctx, MAX_STEPS=steps, STEP_SECONDS=step_s)) for _ in range(n)]
        for job in jobs:
            assert job.wait(timeout=600) is JobStatus.SUCCEEDED, job.info()["error"]
        return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    smoke_flag(parser, f"{SMOKE_JOBS} jobs of {SMOKE_STEPS} step, no wait for the zygotes")
    smoke = parser.parse_args().smoke
    size = (SMOKE_JOBS, SMOKE_STEPS, SMOKE_STEP_SECONDS, 0.0) if smoke else (JOBS, STEPS, STEP_SECONDS, 10.0)
    one = makespan(1, *size)
    two = makespan(2, *size)
    report("scaling", {
        "makespan_1_worker_s": round(one, 2), "makespan_2_workers_s": round(two, 2),
        "ideal_2_workers_s": round(one / 2, 2), "efficiency_2_workers": round(one / 2 / two, 3),
        "goal": ">= 0.9", "jobs": size[0],
    }, smoke=smoke)


if __name__ == "__main__":
    main()
