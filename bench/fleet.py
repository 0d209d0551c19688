"""What a worker costs Redis, and what 1,000 would: commands, bytes and Redis CPU.

1. **Idle workers, measured.** N real workers (`deepe worker`, their own processes, no zygote:
   an idle zygote never talks to Redis) on a private Redis, with a Flower-like event receiver
   (`app.events.State`, what Flower runs), once with Celery's defaults (DEEPE_FLEET=small) and
   once with DEEPE_FLEET=large. Per worker: commands/s by command, bytes/s, Redis CPU.
2. **One training worker, measured.** A real warm worker trains a job that logs one step a
   second (an LLM fine-tune's pace), with the same receiver, in the large profile.
3. **1,000 training workers, replayed.** A model of one training worker (the calls our code
   makes each second: supervisor, progress report, job process, Celery's heartbeat, the
   reaper) is first checked against phase 2's measured command mix, then run as 1,000
   simulated workers, each with its own connection, against the real deepe scripts and key
   shapes, from two generator processes. Reported: Redis CPU % of one core (`INFO cpu`),
   server-side p99 latency per command (`INFO latencystats`), a probe's round-trip p99, and
   memory with 1,000 running jobs' streams.

Goal (issue 15): 1,000 training workers cost <= 10 % of one Redis core, Flower still showing
the workers online. The generators share this machine's two cores with Redis: their achieved
rate is printed beside the target, and a replay that fell short says so.

    .venv/bin/python bench/fleet.py                 # about 4 minutes
    .venv/bin/python bench/fleet.py --workers 20 --window 30 --fleet 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

from common import environment, percentile, report, sft_params, write_method

STEP_METHOD = '''"""A job that logs one step a second, for ever (until cancelled)."""
import time

from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from datasets import Dataset

tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
model = AutoModelForCausalLM.from_pretrained(MODEL_PATH)
ids = tokenizer("The sky is blue.")["input_ids"]
dataset = Dataset.from_list([{"input_ids": ids, "labels": ids}] * 8)


class OneSecondSteps(TrainerCallback):
    def on_step_end(self, *args, **kwargs):
        time.sleep(1.0)


trainer = Trainer(model=model, train_dataset=dataset, callbacks=[callback, OneSecondSteps()],
                  args=TrainingArguments(max_steps=MAX_STEPS, per_device_train_batch_size=1,
                                         logging_steps=1, report_to="none", use_cpu=True))
'''


# -- measuring Redis -----------------------------------------------------------------------------

def _cpu(info: dict[str, Any]) -> float:
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _p99s(r: Any) -> dict[str, float]:
    """Server-side p99 latency (µs) per command since the last CONFIG RESETSTAT."""
    raw: dict[str, Any] = r.info("latencystats")
    out = {}
    for name, values in raw.items():
        if name.startswith("latency_percentiles_usec_"):
            if isinstance(values, str):  # "p50=1.003,p99=2.007,p99.9=4.015"
                values = dict(p.split("=") for p in values.split(","))
            out[name.removeprefix("latency_percentiles_usec_")] = float(values.get("p99", 0))
    return out


def measure(r: Any, window: float, per: int = 1) -> dict[str, Any]:
    """Redis over ``window`` seconds, per ``per`` workers: commands/s by command, bytes/s, CPU %."""
    r.config_resetstat()
    before, t0 = r.info("all"), time.monotonic()
    time.sleep(window)
    after, elapsed = r.info("all"), time.monotonic() - t0
    calls = {k.removeprefix("cmdstat_"): v["calls"] / elapsed / per for k, v in after.items()
             if k.startswith("cmdstat_") and k not in ("cmdstat_info", "cmdstat_config|resetstat")}
    busy = {k.removeprefix("cmdstat_"): v["usec"] / elapsed / per for k, v in after.items()
            if k.startswith("cmdstat_") and k not in ("cmdstat_info", "cmdstat_config|resetstat")}
    net = (after["total_net_input_bytes"] + after["total_net_output_bytes"]
           - before["total_net_input_bytes"] - before["total_net_output_bytes"])
    return {"commands_per_s": round(sum(calls.values()), 2),
            "by_command": {k: round(v, 3) for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v >= 0.005},
            # Time inside each command (a script's own commands are counted in it and on their own)
            "usec_per_s_by_command": {k: round(v, 2) for k, v in sorted(busy.items(), key=lambda kv: -kv[1])
                                      if v >= 0.05},
            "bytes_per_s": round(net / elapsed / per),
            "redis_cpu_pct": round(100 * (_cpu(after) - _cpu(before)) / elapsed / per, 4),
            "p99_usec": {k: v for k, v in _p99s(r).items() if k not in ("info", "config|resetstat")}, "used_memory_mb": round(after["used_memory"] / 2**20, 1),
            "clients": after["connected_clients"]}


class FlowerView:
    """What Flower does: receive the cluster's events into a `State`, and say who is online."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.events.State()
        self.receiver: Any = None
        threading.Thread(target=self._run, daemon=True, name="flower-view").start()

    def _run(self) -> None:
        with self.app.connection() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.state.event})
            self.receiver.capture(limit=None, timeout=None, wakeup=True)

    def online(self) -> int:
        return sum(1 for w in list(self.state.workers.values()) if w.alive)

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True


def _clients(url: str) -> tuple[Any, Any]:
    import redis

    from deepe_tasks.core.settings import get_settings
    from deepe_tasks.worker.celery_app import app_for

    get_settings.cache_clear()
    return redis.Redis.from_url(url, decode_responses=True), app_for(url)


# -- 1 and 2: real workers -----------------------------------------------------------------------

def idle_workers(profile: str, n: int, window: float) -> dict[str, Any]:
    from deepe_tasks.fixtures.embedded import WorkerProcess

    with environment(workers=0, DEEPE_FLEET=profile, DEEPE_WARM="false") as ctx:
        r, app = _clients(ctx["url"])
        env = {k: v for k, v in os.environ.items() if k.startswith("DEEPE_")}
        procs = [WorkerProcess(env, queues="bench", log_file=ctx["work"] / f"idle{i}.log").start() for i in range(n)]
        try:
            for p in procs:
                p.wait_ready(timeout=300)
            view = FlowerView(app)
            time.sleep(15)  # past start-up (mingle, the first heartbeats, the reapers' first round)
            figures = measure(r, window, per=n)
            figures["online_in_flower_view"] = f"{view.online()}/{n}"
            view.stop()
        finally:
            for p in procs:
                p.stop()
    return figures


def training_worker(window: float) -> dict[str, Any]:
    with environment(workers=1, DEEPE_FLEET="large", DEEPE_WARM="true") as ctx:
        from deepe_tasks import EventKind, submit

        r, app = _clients(ctx["url"])
        view = FlowerView(app)
        write_method(ctx, "steps", STEP_METHOD)
        job = submit("steps", sft_params(ctx, MAX_STEPS=100_000))
        deadline = time.monotonic() + 300
        while sum(1 for e in job.events() if e.kind is EventKind.LOG) < 5:
            assert time.monotonic() < deadline and not job.status().is_final, job.info()
            time.sleep(1)
        figures = measure(r, window)
        figures["online_in_flower_view"] = f"{view.online()}/1"
        figures["log_events_per_s"] = round(
            sum(1 for e in job.events() if e.kind is EventKind.LOG) / max(1.0, time.time() - job.info()["started_at"]), 2)
        job.cancel()
        view.stop()
    return figures


# -- 3: the replay -------------------------------------------------------------------------------

HEARTBEAT = json.dumps({"hostname": "sim@host", "freq": 10.0, "sw_ident": "py-celery", "sw_ver": "5.7.0",
                        "sw_sys": "Linux", "active": 1, "processed": 0, "loadavg": [0.5, 0.5, 0.5],
                        "utcoffset": 0, "timestamp": 0.0, "pid": 1, "clock": 1, "type": "worker-heartbeat",
                        "x": "p" * 400})  # about the size of a kombu-wrapped Celery event


async def sim_worker(url: str, i: int, stop_at: float, counters: dict[str, int], events_per_s: float) -> None:
    """One training worker's calls to Redis, second by second (large profile), as our code makes them."""
    import redis.asyncio as aredis

    from deepe_tasks.core import keys, lua
    from deepe_tasks.core.jobstore import _SHAS
    from deepe_tasks.core.records import Event, EventKind

    job = f"sim-{i}"
    conn = aredis.Redis.from_url(url, decode_responses=True, max_connections=1)
    progress_seen, seq, tick = "0", 0, 0
    await asyncio.sleep((i % 100) / 100)  # workers are not in step
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        ops = 0
        await conn.get(keys.cancel(job))  # job process: StopFlags, every second
        ops += 1
        if tick % 2 == 0:
            await conn.get(keys.cancel(job))  # supervisor: the cancel flag, every 2 s
            ops += 1
        for _ in range(max(1, int(events_per_s))):  # job process: its batch of events (the append script)
            seq += 1
            data = Event(kind=EventKind.LOG, job=job, step=seq, metrics={"loss": 1.0, "learning_rate": 1e-4}).to_json()
            await conn.evalsha(_SHAS[lua.APPEND], 1, keys.events(job), keys.job(job), 1, seq, data)
            ops += 1
        if tick % 10 == i % 10:  # every 10 s (large profile)
            recent = await conn.xrevrange(keys.events(job), min=f"({progress_seen}", count=50)  # Flower progress
            ops += 1
            if recent:
                progress_seen = recent[0][0]
                meta = json.dumps({"status": "PROGRESS", "result": {"job": job, "step": seq}, "task_id": job})
                async with conn.pipeline(transaction=True) as pipe:  # update_state, as Celery's backend does it
                    pipe.setex(f"celery-task-meta-{job}", 86400, meta).publish(f"celery-task-meta-{job}", meta)
                    await pipe.execute()
                await conn.publish("/0.celeryev/task.progress", HEARTBEAT)  # the task-progress event
                ops += 5
            await conn.evalsha(_SHAS[lua.RENEW], 2, keys.job(job), keys.lease(job), 1, f"1:sim-{i}", 60_000)
            await conn.publish("/0.celeryev/worker.heartbeat", HEARTBEAT)  # every 10 s (large)
            await conn.set(keys.REAPER, f"sim-{i}", nx=True, px=9000)  # the reaper's lock
            ops += 3
        if tick % 25 == i % 25:
            await conn.ping()  # kombu's and redis-py's health checks
            ops += 1
        counters["ops"] += ops
        tick += 1
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
    await conn.aclose()


def _generator(url: str, first: int, count: int, seconds: float, events_per_s: float, out: Any) -> None:
    async def run() -> int:
        counters = {"ops": 0}
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(sim_worker(url, i, stop_at, counters, events_per_s)
                               for i in range(first, first + count)))
        return counters["ops"]

    out.put(asyncio.run(run()))


def _reaper_rounds(url: str, seconds: float) -> int:
    """The one reaper round per 10 s that the lock lets through, as `lifecycle.reap_once` does it."""
    import redis

    from deepe_tasks.worker.lifecycle import reap_lost

    r = redis.Redis.from_url(url, decode_responses=True)
    rounds, stop_at = 0, time.monotonic() + seconds
    while time.monotonic() < stop_at:
        reap_lost(r)
        rounds += 1
        time.sleep(10)
    return rounds


POPULATED = 500  # stream entries written per simulated job before the replay (memory is projected to the bound)


def populate(r: Any, fleet: int) -> None:
    """``fleet`` running jobs, with their leases and POPULATED events each."""
    from deepe_tasks.core import jobstore, keys
    from deepe_tasks.core.records import Event, EventKind, JobRecord

    for i in range(fleet):
        job = f"sim-{i}"
        record = JobRecord(id=job, method="sim", method_sha256="sim", params={"MAX_STEPS": 100_000},
                           output_dir="/o", queue="bench")
        jobstore.create(r, record, "SOURCE", Event(kind=EventKind.QUEUED, job=job))
        jobstore.claim(r, job, f"sim-{i}", 600_000, Event(kind=EventKind.STARTED, job=job), worker=f"sim-{i}",
                       started_at=time.time(), pid=1)
        pipe = r.pipeline(transaction=False)
        data = Event(kind=EventKind.LOG, job=job, step=1, metrics={"loss": 1.0, "learning_rate": 1e-4}).to_json()
        for _ in range(POPULATED):
            pipe.xadd(keys.events(job), {"data": data, "a": "0", "s": "0"})
        pipe.execute()


def replay(fleet: int, window: float, events_per_s: float) -> dict[str, Any]:
    with environment(workers=0, DEEPE_FLEET="large") as ctx:
        r, _ = _clients(ctx["url"])
        empty = r.info("memory")["used_memory"]
        populate(r, fleet)
        per_entry = (r.info("memory")["used_memory"] - empty) / (fleet * POPULATED)
        from deepe_tasks.core import jobstore, lua

        for script in (lua.APPEND, lua.RENEW):
            r.script_load(script)
        assert set(jobstore._SHAS) >= {lua.APPEND, lua.RENEW}
        settle = 10.0
        results: Any = multiprocessing.get_context("spawn").Queue()
        half = fleet // 2
        gens = [multiprocessing.get_context("spawn").Process(
            target=_generator, args=(ctx["url"], first, count, settle + window + 2, events_per_s, results))
            for first, count in ((0, half), (half, fleet - half))]
        started = time.monotonic()
        for g in gens:
            g.start()
        reaper = threading.Thread(target=_reaper_rounds, args=(ctx["url"], settle + window), daemon=True)
        reaper.start()
        probe: list[float] = []
        probe_stop = threading.Event()

        def probing() -> None:
            import redis

            c = redis.Redis.from_url(ctx["url"])
            while not probe_stop.wait(0.01):
                t0 = time.perf_counter()
                c.echo("probe")  # a command nothing else sends: the probe's own, apart in the figures
                probe.append((time.perf_counter() - t0) * 1000)

        time.sleep(settle)
        threading.Thread(target=probing, daemon=True).start()
        figures = measure(r, window)
        probe_stop.set()
        ops = sum(results.get(timeout=120) for _ in gens)
        for g in gens:
            g.join(timeout=60)
        elapsed = time.monotonic() - started
    figures.update({
        "simulated_workers": fleet, "events_per_worker_per_s": events_per_s,
        "generator_ops_per_s": round(ops / elapsed), "probe_rtt_p50_ms": round(percentile(probe, 50), 3),
        "probe_rtt_p99_ms": round(percentile(probe, 99), 3),
        "bytes_per_stream_entry": round(per_entry),
        "projected_memory_mb_streams_at_bound": round(
            (figures["used_memory_mb"] * 2**20 + fleet * (lua.STREAM_MAXLEN - POPULATED) * per_entry) / 2**20),
    })
    return figures


def model_check(measured: dict[str, Any], events_per_s: float) -> dict[str, Any]:
    """The replay's model of one worker (1 simulated worker, for 30 s) beside phase 2's measure."""
    with environment(workers=0, DEEPE_FLEET="large") as ctx:
        r, _ = _clients(ctx["url"])
        populate(r, 1)
        from deepe_tasks.core import lua

        for script in (lua.APPEND, lua.RENEW):
            r.script_load(script)
        results: Any = multiprocessing.get_context("spawn").Queue()
        g = multiprocessing.get_context("spawn").Process(target=_generator,
                                                         args=(ctx["url"], 0, 1, 32, events_per_s, results))
        g.start()
        time.sleep(1)
        simulated = measure(r, 30)
        g.join(timeout=60)
    return {"measured_commands_per_s": measured["commands_per_s"], "model_commands_per_s": simulated["commands_per_s"],
            "measured_by_command": measured["by_command"], "model_by_command": simulated["by_command"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=10, help="real idle workers to start")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of each measurement")
    parser.add_argument("--fleet", type=int, default=1000, help="simulated training workers")
    parser.add_argument("--events-per-s", type=float, default=1.0, help="log events per training worker")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    idle = {profile: idle_workers(profile, args.workers, args.window) for profile in ("small", "large")}
    training = training_worker(args.window)
    check = model_check(training, args.events_per_s)
    fleet = replay(args.fleet, args.window, args.events_per_s)
    out = report("fleet", {
        "idle_worker_small_profile": idle["small"], "idle_worker_large_profile": idle["large"],
        "training_worker_large_profile": training, "replay_model_check": check,
        f"replay_{args.fleet}_training_workers": fleet,
        "goal": f"{args.fleet} training workers <= 10 % of one Redis core",
        "met": fleet["redis_cpu_pct"] <= 10.0,
    })
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
