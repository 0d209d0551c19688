"""Seconds from submit to the first `log` event of a 2-rank job on a warm worker (`deepe worker
--gpus 0,1`: CPU ranks, gloo), against a cold `torchrun --nproc_per_node 2` of the same method
and parameters, from its launch to its first step."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from common import ROOT, environment, median, report, sft_params, smoke_flag

RUNS = 3
# What torchrun runs: the method, with its parameters and a callback that says when step 1 ended.
SCRIPT = '''
import json, sys
from transformers import TrainerCallback

class First(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and state.is_world_process_zero:
            print("first step", flush=True)

params = json.loads(sys.argv[2])
namespace = {name: None for name in ("PromptInputColumn", "PromptOutputColumn", "EVAL_DATASET_PATH", "EVAL_SPLIT",
                                     "EVAL_STEPS")}
namespace.update({"KEEP_BEST": False, "LOAD_IN_4BIT": False, "MAX_SAMPLES": 0, "GRAD_ACCUM_STEPS": 1, "WARMUP_STEPS": 0,
                  "NUM_EPOCHS": 1, "MAX_GRAD_NORM": 1.0, **params, "params": params, "callback": First()})
exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), namespace)
namespace["trainer"].args.output_dir = "torchrun-out"
namespace["trainer"].train()
'''


def ours(params: dict[str, Any]) -> float:
    from deepe_tasks import EventKind, submit

    t0 = time.time()
    job = submit("sft-demo", params, gpus=2)
    first = next(e for e in job.events(follow=True) if e.kind in (EventKind.LOG, EventKind.FAILED))
    assert first.kind is EventKind.LOG, first.message
    job.wait(timeout=180)
    return first.ts - t0


def baseline(ctx: dict[str, Any], params: dict[str, Any]) -> float:
    from deepe_tasks.fixtures.embedded import free_port

    script = ctx["work"] / "torchrun_sft.py"
    script.write_text(SCRIPT)
    method = ROOT / "deepe_tasks" / "builtin" / "sft-demo.py"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(script), str(method), json.dumps(params)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ctx["work"])
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("first step"):
            elapsed = time.monotonic() - t0
            break
    else:
        raise RuntimeError("torchrun never reached step 1")
    proc.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    smoke_flag(parser, "1 run of each, of 1 step")
    smoke = parser.parse_args().smoke
    runs = 1 if smoke else RUNS
    with environment(workers=0) as ctx:
        from deepe_tasks import submit
        from deepe_tasks.fixtures.embedded import WorkerProcess

        worker = WorkerProcess({}, queues="bench", log_file=ctx["work"] / "ddp-worker.log",
                               extra_args=["--gpus", "0,1"]).start()
        try:
            worker.wait_ready()
            params = sft_params(ctx, MAX_STEPS=1) if smoke else sft_params(ctx)
            submit("sft-demo", params, gpus=2).wait(timeout=180)  # the first job: the zygote imports the stack
            warm, cold = [], []
            for _ in range(runs):
                warm.append(ours(params))
                cold.append(baseline(ctx, params))
        finally:
            worker.stop()
        report("ddp_time_to_first_step", {
            "ranks": 2, "ours_s": round(median(warm), 3), "baseline_s": round(median(cold), 3),
            "ratio": round(median(warm) / median(cold), 3), "goal": "<= 0.25", "runs": runs,
            "ours_all": [round(x, 3) for x in warm], "baseline_all": [round(x, 3) for x in cold],
        }, smoke=smoke)


if __name__ == "__main__":
    main()
