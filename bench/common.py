"""Shared set-up for the benchmarks: a private Redis, workers, a tiny model, timing helpers."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def environment(workers: int = 0, queue: str = "bench", **env: str) -> Iterator[dict[str, Any]]:
    """A private Redis and storage, `workers` warm workers on `queue`, a tiny model and dataset."""
    work = Path(tempfile.mkdtemp(prefix="deepe-bench-"))
    from deepe_tasks.fixtures.embedded import RedisServer, WorkerProcess

    with RedisServer(folder=work / "redis") as server:
        settings = {"DEEPE_REDIS_URL": server.url, "DEEPE_STORAGE": str(work / "storage"),
                    "DEEPE_METHOD_STORE": str(work / "methods"), "DEEPE_QUEUE": queue,
                    "TOKENIZERS_PARALLELISM": "false", **env}
        os.environ.update(settings)
        from deepe_tasks.core.settings import get_settings
        from deepe_tasks.fixtures import tiny

        get_settings.cache_clear()
        (work / "methods").mkdir()
        for name in ("sft-demo.py", "custom-template.py", "run_local_train_test_template.py"):
            (work / "methods" / name).write_text((ROOT / "deepe_tasks" / "builtin" / name).read_text())
        model = tiny.build_model(work / "storage" / "base")
        data = tiny.write_jsonl(tiny.sft_rows(64), work / "storage" / "data.jsonl")
        procs = [WorkerProcess(settings, queues=queue, log_file=work / f"worker{i}.log").start()
                 for i in range(workers)]
        try:
            for p in procs:
                p.wait_ready()
            yield {"work": work, "model": model, "data": data, "url": server.url, "workers": procs}
        finally:
            for p in procs:
                p.stop()


def sft_params(ctx: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"MODEL_PATH": str(ctx["model"]), "DATASET_PATH": str(ctx["data"]), "MAX_STEPS": 3,
            "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "LEARNING_RATE": 5e-3, **extra}


def write_method(ctx: dict[str, Any], name: str, source: str) -> str:
    (ctx["work"] / "methods" / f"{name}.py").write_text(source)
    return name


def smoke_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--smoke``: the benchmark in a size that runs in seconds (``what``), to check that it still
    works (tests/test_bench_smoke.py runs every one so); its figures mean nothing."""
    parser.add_argument("--smoke", action="store_true", help=f"a few seconds' check that it runs: {what}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def report(name: str, figures: dict[str, Any], smoke: bool = False) -> dict[str, Any]:
    """Print the benchmark's one JSON object. ``smoke``: it ran in its smoke size (`--smoke`),
    which checks that it still works; its figures mean nothing."""
    out = {"bench": name, "smoke": smoke, **figures, "machine": machine(),
           "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(out))
    return out


def running_job(client: Any, job_id: str) -> int:
    """A job record that is running its first attempt, so that its events are accepted (they are
    fenced: only the current attempt's reach the stream). Returns the attempt."""
    from deepe_tasks.core import jobstore
    from deepe_tasks.core.records import Event, EventKind, JobRecord

    record = JobRecord(id=job_id, method="bench", method_sha256="0", params={}, output_dir="", queue="bench")
    jobstore.create(client, record, "", Event(kind=EventKind.QUEUED, job=job_id))
    claim = jobstore.claim(client, job_id, "bench", 3_600_000, Event(kind=EventKind.STARTED, job=job_id),
                           worker="bench", started_at=0.0, pid=0)
    assert claim.record is not None
    return claim.record.attempts
