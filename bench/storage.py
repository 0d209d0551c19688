"""Object storage costs, each against its folder baseline in the same run, on a real S3 HTTP
endpoint on this machine (moto's standalone server: loopback, objects in memory, so the
figures are deepe's own costs, not a network's):

- training step time while a checkpoint uploads (deepe's uploader thread, sending a
  checkpoint-sized folder again and again) against the same run's steps with no upload in
  flight, in alternating phases of one run (`step_ratio`: what "uploaded without stalling
  training" costs),
  and the CPU time the process spends per step in each kind of block (the uploader's own cost).
  The server is kept on a CPU of its own and training on the others, so that the server's work
  (which a real store does elsewhere) does not count as deepe's;
- publishing a model of 100 MB and of 1 GB: upload under the attempt's key, then the conditional
  create of deepe.json, against the atomic rename (with fsync) on a folder;
- a base model's fetch into a worker's cache (a miss) against a read of the cached copy (a hit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from common import environment, median, report, sft_params, smoke_flag

PHASE_S = 1.5  # seconds of back-to-back uploads, then as long without
STEPS = 800
CHECKPOINT_MB = 50
PUBLISH_MB = [100, 1024]
BASE_MB = 200
SMOKE: dict[str, Any] = {"steps": 60, "checkpoint_mb": 2, "publish_mb": [2], "base_mb": 2}


def payload(folder: Path, mb: int) -> Path:
    """A model-like folder: one weights file of ``mb`` MiB and a small config."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "model.safetensors").open("wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    (folder / "config.json").write_text("{}")
    return folder


def step_ratio(ctx: dict[str, Any], store: Any, work: Path, steps: int, checkpoint_mb: int) -> dict[str, Any]:
    """Median step time while an upload is in flight, over steps with none, in one run.

    Uploads run back to back in phases of PHASE_S seconds, alternating with phases of none. A
    step counts as "uploading" when an upload was in flight at both its ends, as "not" when none
    was at either; a step across a switch is left out."""
    from transformers import TrainerCallback

    from deepe_tasks.ui.local import local_runner

    checkpoint = payload(work / "checkpoint", checkpoint_mb)
    uploading, busy, stop = threading.Event(), threading.Event(), threading.Event()
    uploads: list[float] = []

    def upload_loop() -> None:
        n = 0
        while not stop.is_set():
            if not uploading.wait(0.05):
                continue
            busy.set()
            t0 = time.monotonic()
            store.put_tree(checkpoint, f"bench/checkpoint-{n}", last=["config.json"])
            uploads.append(time.monotonic() - t0)
            if not uploading.is_set():
                busy.clear()
            n += 1

    times: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}

    class Phases(TrainerCallback):
        last: tuple[float, float, bool] | None = None
        switched = time.monotonic()

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            now = (time.monotonic(), time.process_time(), busy.is_set())
            if self.last is not None and self.last[2] == now[2]:
                times[now[2]].append(now[0] - self.last[0])
                cpu[now[2]].append(now[1] - self.last[1])
            self.last = now
            if now[0] - self.switched >= PHASE_S:
                self.switched = now[0]
                if uploading.is_set():
                    uploading.clear()  # busy clears once the upload in flight ends
                else:
                    uploading.set()

    runner = local_runner(ctx["work"] / "methods" / "sft-demo.py",
                          sft_params(ctx, MAX_STEPS=steps, OUTPUT_DIR=f"models/{uuid.uuid4().hex}"), lambda e: None)
    trainer = runner.build()
    trainer.add_callback(Phases())
    thread = threading.Thread(target=upload_loop, daemon=True)
    thread.start()
    try:
        trainer.train()
    finally:
        stop.set()
        uploading.set()
        thread.join(timeout=60)
    with_upload, without = median(times[True]), median(times[False])
    return {"step_s_uploading": round(with_upload, 4), "step_s_not_uploading": round(without, 4),
            "step_ratio": round(with_upload / without, 3),
            "cpu_s_per_step_uploading": round(median(cpu[True]), 4),
            "cpu_s_per_step_not_uploading": round(median(cpu[False]), 4),
            "steps_each": [len(times[True]), len(times[False])],
            "checkpoint_mb": checkpoint_mb, "checkpoint_uploads": len(uploads),
            "checkpoint_upload_s_median": round(median(uploads), 3) if uploads else None}


def publish_times(url: str, work: Path, sizes: list[int]) -> list[dict[str, Any]]:
    """Publishing a staged model on the store, against the rename on a folder."""
    from deepe_tasks.core.records import JobSpec
    from deepe_tasks.core.storage import publish
    from deepe_tasks.job.remote import Remote

    out = []
    for mb in sizes:
        staged = payload(work / f"staged-{mb}", mb)
        job = uuid.uuid4().hex
        (staged / "deepe.json").write_text(json.dumps({"job": job, "claim": "bench", "submitted_at": 1.0}))
        folder_root = work / "folder-storage"
        copy = folder_root / "models" / f".staging-{job}"
        shutil.copytree(staged, copy)
        t0 = time.monotonic()
        publish(copy, folder_root / "models" / job, job_id=job, storage_root=folder_root, claim="bench",
                submitted_at=1.0)
        folder_s = time.monotonic() - t0
        spec = JobSpec(job_id=job, method="bench", method_sha256="0" * 64, source="", storage_root=str(work / "mirror"),
                       params={"OUTPUT_DIR": f"{url}/models/{job}"}, claim="bench", submitted_at=1.0,
                       storage_url=url, cache_dir=str(work / "cache"))
        remote = Remote(spec)
        remote.localize()
        t0 = time.monotonic()
        remote.publish(staged, what="model", fix="")
        store_s = time.monotonic() - t0
        out.append({"mb": mb, "folder_s": round(folder_s, 3), "store_s": round(store_s, 3),
                    "ratio": round(store_s / folder_s, 1), "store_mb_per_s": round(mb / store_s, 1)})
        shutil.rmtree(staged)
        shutil.rmtree(folder_root / "models" / job)
    return out


def cache_times(store: Any, work: Path, mb: int) -> dict[str, Any]:
    from deepe_tasks.core.cache import InputCache

    store.put_tree(payload(work / "base", mb), "base/model")
    cache = InputCache(work / "cache-inputs", 100 << 30)
    t0 = time.monotonic()
    cache.fetch(store, "base/model")
    miss = time.monotonic() - t0
    t0 = time.monotonic()
    cache.fetch(store, "base/model")
    hit = time.monotonic() - t0
    assert (cache.misses, cache.hits) == (1, 1)
    return {"base_mb": mb, "miss_s": round(miss, 3), "hit_s": round(hit, 4), "miss_over_hit": round(miss / hit, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    smoke_flag(parser, "a 60-step run, 2 MB checkpoints and models")
    args = parser.parse_args()
    size: dict[str, Any] = SMOKE if args.smoke else {"steps": STEPS, "checkpoint_mb": CHECKPOINT_MB, "publish_mb": PUBLISH_MB,
                                     "base_mb": BASE_MB}
    from deepe_tasks.core.objects import ObjectStore
    from tests.s3 import MotoServer, aws_environment

    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = {cpus[-1]} if len(cpus) > 1 else None
    if server_cpus:  # training (and deepe's uploader) on the others
        import torch

        os.sched_setaffinity(0, set(cpus[:-1]))
        torch.set_num_threads(len(cpus) - 1)
    with environment() as ctx:
        work: Path = ctx["work"]
        server = MotoServer(work / "moto.log", cpus=server_cpus).start()
        try:
            with aws_environment(server.env):
                server.make_bucket("deepe-bench")
                url = f"s3://deepe-bench/{uuid.uuid4().hex[:6]}"
                store = ObjectStore(url)
                steps = step_ratio(ctx, store, work, size["steps"], size["checkpoint_mb"])
                published = publish_times(url, work, size["publish_mb"])
                cached = cache_times(store, work, size["base_mb"])
        finally:
            server.stop()
    report("storage", {**steps, "publish": published, "cache": cached,
                       "endpoint": "moto_server on loopback (objects in memory)",
                       "server_cpus": sorted(server_cpus or []), "training_cpus": sorted(os.sched_getaffinity(0))},
           smoke=args.smoke)


if __name__ == "__main__":
    main()
