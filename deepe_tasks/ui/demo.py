"""`deepe demo`: the whole path on one machine, with nothing to configure.

A private Redis, one worker, a tiny Llama built here, SFT-Demo submitted and followed live.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

from deepe_tasks.core.settings import get_settings

DEMO_QUEUE = "demo"


def run_demo(console: Console, steps: int = 30) -> int:
    from deepe_tasks.core.records import JobStatus
    from deepe_tasks.fixtures import tiny
    from deepe_tasks.fixtures.embedded import RedisServer, WorkerProcess
    from deepe_tasks.queue.client import submit
    from deepe_tasks.ui.display import follow

    storage = get_settings().storage_root
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="deepe-demo-"))
    with RedisServer(folder=workdir / "redis") as server:
        env = {"DEEPE_REDIS_URL": server.url, "DEEPE_STORAGE": str(storage), "DEEPE_QUEUE": DEMO_QUEUE}
        os.environ.update(env)
        get_settings.cache_clear()
        console.print(f"[cyan]private Redis[/] at {server.url}")
        log_file = workdir / "worker.log"
        with WorkerProcess(env, queues=DEMO_QUEUE, name="demo@%h", log_file=log_file) as worker:
            console.print(f"[cyan]worker[/] starting (log: {log_file})")
            model_dir = storage / "demo" / "tiny-llama"
            data = storage / "demo" / "colors.jsonl"
            tiny.cached_model(model_dir)
            tiny.write_jsonl(tiny.sft_rows(64), data)
            console.print(f"[cyan]tiny model[/] in {model_dir}, dataset {data}")
            worker.wait_ready()
            job = submit("sft-demo", {
                "MODEL_PATH": str(model_dir), "DATASET_PATH": str(data), "MAX_STEPS": steps,
                "BATCH_SIZE": 4, "LEARNING_RATE": 5e-3, "MAX_SEQ_LENGTH": 64, "LORA_RANK": 8,
            })
            console.print(f"[cyan]submitted[/] SFT-Demo as job {job.id}")
            follow(job.events(follow=True), console)
            final = job.wait(timeout=60)
            info = job.info()
    if final is not JobStatus.SUCCEEDED:
        console.print(Text(f"the demo job {final.value}: ", style="red") + Text(str(info.get("error"))))
        return 1
    console.print(Text(f"model saved to {info['output_dir']}", style="green")
                  + Text(f" (with deepe.json) in {time.monotonic() - t0:.0f} s"), soft_wrap=True)
    console.print(TRY_YOUR_OWN.format(model=model_dir.relative_to(storage), data=data.relative_to(storage),
                                      storage=storage), soft_wrap=True, highlight=False)
    return 0


# Printed after the demo: the README's "try your own method", with the paths the demo made.
TRY_YOUR_OWN = """
The tiny model and dataset stay in {storage} for you to try things with. Your own method:
  deepe methods new custom01       # then paste your training code into method_store/custom01.py
  deepe run-local custom01 -p MODEL_PATH={model} -p DATASET_PATH={data} -p MAX_STEPS=5"""
