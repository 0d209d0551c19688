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


def _method_store() -> Path:
    """The configured store if it holds SFT-Demo, else the one beside this package's source."""
    configured = get_settings().method_root
    if (configured / "sft-demo.py").is_file():
        return configured
    return Path(__file__).resolve().parent.parent / "method_store"


def run_demo(console: Console, steps: int = 30) -> int:
    from deepe_tasks.core.records import JobStatus
    from deepe_tasks.fixtures import tiny
    from deepe_tasks.fixtures.embedded import RedisServer, WorkerProcess
    from deepe_tasks.queue.client import submit
    from deepe_tasks.ui.display import follow

    storage = get_settings().storage_root
    store = _method_store()
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="deepe-demo-"))
    with RedisServer(folder=workdir / "redis") as server:
        env = {"DEEPE_REDIS_URL": server.url, "DEEPE_STORAGE": str(storage),
               "DEEPE_METHOD_STORE": str(store), "DEEPE_QUEUE": DEMO_QUEUE}
        os.environ.update(env)
        get_settings.cache_clear()
        console.print(f"[cyan]private Redis[/] at {server.url}")
        log_file = workdir / "worker.log"
        with WorkerProcess(env, queues=DEMO_QUEUE, name="demo@%h", log_file=log_file) as worker:
            console.print(f"[cyan]worker[/] starting (log: {log_file})")
            model_dir = storage / "demo" / "tiny-llama"
            data = storage / "demo" / "colors.jsonl"
            tiny.build_model(model_dir)
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
    return 0
