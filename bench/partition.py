"""A partition at a random step, over many runs: one model each time, how long two trainers
overlapped, and how many stale events reached the stream after the link came back.

Each run: a worker on its own network host (tests/netns.py, needs root) trains a job; at a
random step its link to Redis is cut, a second worker takes the job over, the job succeeds,
and the link is healed. Figures per run and their worst case, as JSON:

- `models`: folders of the job published beside OUTPUT_DIR (must be 1), and the attempt that
  published the model (must be the second);
- `step_overlap_s`: the last training step of the cut-off attempt (its events.jsonl lines)
  minus the first step of the attempt that replaced it; > 0 means both trained at once;
- `process_overlap_s`: the cut-off job process's exit minus the second attempt's `started`
  (it includes the cut-off attempt's checkpoint and exit, after its last step);
- `stale_events_after_heal`: entries added to the job's stream, or changes to its record,
  after the job succeeded and the cut-off worker was back online (must be 0).

    python bench/partition.py [--runs 10] [--seed N]
    python bench/partition.py --smoke       # 1 run of 12 steps, cut at step 3

Where network hosts cannot be made (no root, no `ip netns`), `--smoke` prints a JSON object
with `skipped` (the reason) and exits 0; a full run exits with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from common import report, smoke_flag

TTL = 4.0
FAST = {"DEEPE_LEASE_TTL": f"{TTL:g}", "DEEPE_CHECKPOINT_MINUTES": "0.02", "DEEPE_CANCEL_GRACE": "5"}
MAX_STEPS = 40
SMOKE_STEPS = 12


def one_run(work: Path, model: Path, data: Path, cut_step: int, n: int, max_steps: int = MAX_STEPS) -> dict[str, Any]:
    from deepe_tasks import JobStatus, submit
    from deepe_tasks.core import keys
    from deepe_tasks.core.broker import app_for
    from deepe_tasks.core.connection import get_redis
    from deepe_tasks.core.settings import get_settings
    from deepe_tasks.fixtures.embedded import RedisServer, WorkerProcess
    from tests.helpers import process_gone, wait_for
    from tests.netns import NetHost

    host = NetHost().create()
    server = RedisServer(folder=work / f"redis-{n}", bind=("127.0.0.1", host.host_ip)).start()
    os.environ["DEEPE_REDIS_URL"] = server.url
    get_settings.cache_clear()
    queue = f"part-{n}"
    workers = []
    try:
        cut_off = WorkerProcess({**FAST, "DEEPE_REDIS_URL": server.url_at(host.host_ip)}, queues=queue,
                                prefix=host.command([]), log_file=work / f"a-{n}.log").start()
        workers.append(cut_off)
        cut_off.wait_ready()
        job = submit("slow", {"MODEL_PATH": str(model), "DATASET_PATH": str(data), "MAX_STEPS": max_steps,
                              "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "LEARNING_RATE": 5e-3,
                              "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}, queue=queue)
        wait_for(lambda: any(e.step and e.step >= cut_step and e.kind.value == "log" for e in job.events()), 180)
        old_pid = int(job.info()["pid"])
        host.cut()
        workers.append(WorkerProcess(FAST, queues=queue, log_file=work / f"b-{n}.log").start())
        t_gone = wait_for(lambda: time.time() if process_gone(old_pid) else None, 120, 0.05)
        status = job.wait(timeout=300)
        r = get_redis()
        before = (r.hgetall(keys.job(job.id)), r.xrange(keys.events(job.id)))
        host.heal()
        app = app_for(server.url)
        name = cut_off.name.replace("%h", os.uname().nodename)
        wait_for(lambda: any(name in reply for reply in (app.control.ping(timeout=0.5) or [])), 120, 0.5)
        time.sleep(TTL)  # a round of the healed worker's renewals and flushes
        after = (r.hgetall(keys.job(job.id)), r.xrange(keys.events(job.id)))
        stale = len(after[1]) - len(before[1]) + (0 if after[0] == before[0] else 1)
        stream = [json.loads(fields["data"]) for _, fields in after[1]]
        out = Path(job.info()["output_dir"])
        published = [p.name for p in out.parent.iterdir() if job.id in p.name or p == out]
        manifest = json.loads((out / "deepe.json").read_text()) if (out / "deepe.json").exists() else {}
        jsonl = [json.loads(line) for line in (work / "storage" / "jobs" / job.id / "events.jsonl").read_text().splitlines()]
        old_steps = [e["ts"] for e in jsonl if e.get("attempt") == 1 and e["kind"] == "log" and "loss" in e["metrics"]]
        new_steps = [e["ts"] for e in stream if e.get("attempt") == 2 and e["kind"] == "log" and "loss" in e["metrics"]]
        new_started = [e["ts"] for e in stream if e.get("attempt") == 2 and e["kind"] == "started"]
        return {
            "cut_step": cut_step, "status": status.value, "attempts": job.info()["attempts"],
            "models": len(published), "published_by_attempt": manifest.get("attempt"),
            "step_overlap_s": round(max(old_steps) - min(new_steps), 3) if old_steps and new_steps else None,
            "process_overlap_s": round(t_gone - new_started[0], 3) if new_started else None,
            "stale_events_after_heal": stale,
            "ok": status is JobStatus.SUCCEEDED and len(published) == 1 and manifest.get("attempt") == 2,
        }
    finally:
        host.heal()
        for w in workers:
            w.stop()
        host.remove()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None)
    smoke_flag(parser, f"1 run of {SMOKE_STEPS} steps, cut at step 3")
    args = parser.parse_args()
    count, max_steps = (1, SMOKE_STEPS) if args.smoke else (args.runs, MAX_STEPS)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="deepe-bench-partition-"))
    os.environ.update({"DEEPE_STORAGE": str(work / "storage"), "DEEPE_METHOD_STORE": str(work / "methods"),
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    from deepe_tasks.fixtures import tiny
    from tests.helpers import SLOW_METHOD
    from tests.netns import available

    reason = available()
    if reason and args.smoke:
        report("partition", {"skipped": reason}, smoke=True)
        return
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    (work / "methods").mkdir()
    (work / "methods" / "slow.py").write_text(SLOW_METHOD)
    model = tiny.build_model(work / "storage" / "base")
    data = tiny.write_jsonl(tiny.sft_rows(64), work / "storage" / "data.jsonl")
    runs = [one_run(work, model, data, rng.randint(3, max(3, max_steps - 10)), n, max_steps) for n in range(count)]
    overlaps = [r["step_overlap_s"] for r in runs if r["step_overlap_s"] is not None]
    report("partition", {
        "runs": len(runs), "lease_ttl_s": TTL,
        "all_ok": all(r["ok"] for r in runs),
        "models_published": [r["models"] for r in runs],
        "max_step_overlap_s": max(overlaps) if overlaps else None,
        "max_process_overlap_s": max(r["process_overlap_s"] or 0 for r in runs),
        "stale_events_after_heal": sum(r["stale_events_after_heal"] for r in runs),
        "per_run": runs,
    }, smoke=args.smoke)


if __name__ == "__main__":
    main()
