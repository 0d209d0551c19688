"""What a worker costs Redis, and what 1,000 would: commands, bytes and Redis CPU.

1. **Idle workers, measured.** N real workers (`deepe worker`, their own processes, no zygote:
   an idle zygote never talks to Redis) on a private Redis, with a Flower-like event receiver
   (`app.events.State`, what Flower runs), with Celery's defaults (DEEPE_FLEET=small) at N/2
   and N workers (gossip: what Redis sends each worker grows with N, so the fleet's total with
   N²) and with DEEPE_FLEET=large at N. Per worker: commands/s by command, bytes/s, Redis CPU.
2. **One training worker, measured.** A real warm worker trains a job that logs one step a
   second (an LLM fine-tune's pace), with the same receiver, in the large profile.
3. **1,000 training workers, replayed.** A model of one training worker (the calls our code
   makes each second: supervisor, progress report, job process, Celery's heartbeat, the
   reaper) is first checked against phase 2's measured command mix, then run as 1,000
   simulated workers, each with its own command connection and as many more connections as a
   real worker holds (one of them PSUBSCRIBEd to its remote-control box, as kombu does), a
   Flower receiving every event and broadcasting `enable_events` every 5 s, against the real
   deepe scripts and key shapes, from two generator processes. Reported: Redis CPU % of one core (`INFO cpu`),
   server-side p99 latency per command (`INFO latencystats`), a probe's round-trip p99, and
   memory with 1,000 running jobs' streams.

Goal (issue 15): 1,000 training workers cost <= 10 % of one Redis core, Flower still showing
the workers online. The generators share this machine's two cores with Redis: their achieved
rate is printed beside the target, and a replay that fell short says so.

    .venv/bin/python bench/fleet.py --window 30                 # everything, about 10 minutes
    .venv/bin/python bench/fleet.py --phases idle --workers 20 --window 60 --out bench/fleet.json
    .venv/bin/python bench/fleet.py --phases training,replay --window 60 --out bench/fleet.json
    .venv/bin/python bench/fleet.py --smoke                     # every phase, tiny: does it still run?

`--out` adds the phases run to what the file already holds (two runs, each under 10 minutes).
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

from common import environment, percentile, report, sft_params, smoke_flag, write_method
from scaling import FIXED  # a job whose steps take STEP_SECONDS each

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
    net_in = after["total_net_input_bytes"] - before["total_net_input_bytes"]
    net_out = after["total_net_output_bytes"] - before["total_net_output_bytes"]
    return {"commands_per_s": round(sum(calls.values()), 2),
            "by_command": {k: round(v, 3) for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v >= 0.005},
            # Time inside each command (a script's own commands are counted in it and on their own)
            "usec_per_s_by_command": {k: round(v, 2) for k, v in sorted(busy.items(), key=lambda kv: -kv[1])
                                      if v >= 0.05},
            "bytes_per_s": round((net_in + net_out) / elapsed / per),
            "bytes_in_per_s": round(net_in / elapsed / per), "bytes_out_per_s": round(net_out / elapsed / per),
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

    from deepe_tasks.core.broker import app_for
    from deepe_tasks.core.settings import get_settings

    get_settings.cache_clear()
    return redis.Redis.from_url(url, decode_responses=True), app_for(url)


# -- 1 and 2: real workers -----------------------------------------------------------------------

def idle_workers(profile: str, n: int, window: float, settle: float = 15.0) -> dict[str, Any]:
    from deepe_tasks.fixtures.embedded import WorkerProcess

    with environment(workers=0, DEEPE_FLEET=profile, DEEPE_WARM="false") as ctx:
        r, app = _clients(ctx["url"])
        env = {k: v for k, v in os.environ.items() if k.startswith("DEEPE_")}
        procs = [WorkerProcess(env, queues="bench", log_file=ctx["work"] / f"idle{i}.log").start() for i in range(n)]
        try:
            for p in procs:
                p.wait_ready(timeout=300)
            view = FlowerView(app)
            time.sleep(settle)  # past start-up (mingle, the first heartbeats, the reapers' first round)
            figures = measure(r, window, per=n)
            figures["online_in_flower_view"] = f"{view.online()}/{n}"
            view.stop()
        finally:  # all at once: a large-profile worker takes a few seconds to stop (its 10 s poll)
            stopping = [threading.Thread(target=p.stop) for p in procs]
            for t in stopping:
                t.start()
            for t in stopping:
                t.join()
    return figures


def training_worker(window: float, logs: int = 5) -> dict[str, Any]:
    with environment(workers=1, DEEPE_FLEET="large", DEEPE_WARM="true") as ctx:
        from deepe_tasks import EventKind, submit

        r, app = _clients(ctx["url"])
        view = FlowerView(app)
        write_method(ctx, "steps", FIXED)
        job = submit("steps", sft_params(ctx, MAX_STEPS=100_000, STEP_SECONDS=1.0))
        deadline = time.monotonic() + 300
        while sum(1 for e in job.events() if e.kind is EventKind.LOG) < logs:
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


def model_ops_per_s(events_per_s: float) -> float:
    """The calls one simulated worker makes a second (what `sim_worker` aims at), once settled."""
    return 1 + 0.5 + max(1, int(events_per_s)) + (1 + 5 + 3) / 10 + 1 / 25


async def sim_worker(url: str, i: int, stop_at: float, buckets: dict[int, int], events_per_s: float) -> None:
    """One training worker's calls to Redis, second by second (large profile), as our code makes them."""
    import redis.asyncio as aredis

    from deepe_tasks.core import keys, lua
    from deepe_tasks.core.records import Event, EventKind
    from deepe_tasks.core.scripts import SHAS as _SHAS

    job = f"sim-{i}"
    conn = aredis.Redis.from_url(url, decode_responses=True, max_connections=1)
    progress_seen: Any = "0"
    seq, tick = 0, 0
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
                    pipe.setex(f"celery-task-meta-{job}", 86400, meta)
                    pipe.publish(f"celery-task-meta-{job}", meta)
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
        second = int(time.time())
        buckets[second] = buckets.get(second, 0) + ops  # by wall-clock second: the window's share is counted
        tick += 1
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
    await conn.aclose()


def _generator(url: str, first: int, count: int, seconds: float, events_per_s: float, out: Any) -> None:
    """Simulated workers ``first`` .. ``first + count`` on one event loop; puts the calls made in
    each wall-clock second and the CPU seconds this process used."""
    async def run() -> dict[int, int]:
        buckets: dict[int, int] = {}
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(sim_worker(url, i, stop_at, buckets, events_per_s)
                               for i in range(first, first + count)))
        return buckets

    cpu0 = time.process_time()
    buckets = asyncio.run(run())
    out.put({"buckets": buckets, "cpu_s": time.process_time() - cpu0})


def _achieved(results: list[dict[str, Any]], t0: float, t1: float) -> float:
    """Calls per second the generators made in the whole seconds inside [t0, t1] (wall clock)."""
    seconds = range(int(t0) + 1, int(t1))
    calls: int = sum(res["buckets"].get(s, 0) for res in results for s in seconds)
    return calls / max(1, len(seconds))


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


PIDBOX = "/0.celery.pidbox"  # kombu PSUBSCRIBEs each worker's remote-control box (fanout over PUB/SUB)
ENABLE_EVENTS = json.dumps({"method": "enable_events", "arguments": {}, "destination": None, "pattern": None,
                            "matcher": None, "x": "p" * 300})  # about the size of Flower's broadcast


def _connections(url: str, count: int, subscribed: int, seconds: float, out: Any) -> None:
    """``count`` more connections, as a real worker holds them beside its command connection; the
    first ``subscribed`` PSUBSCRIBE the remote-control box (Redis matches each PUBLISH against
    every pattern). All are drained until ``seconds`` pass; puts how many were opened."""
    import selectors
    import socket
    from urllib.parse import urlparse

    where = urlparse(url)
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(count):
        s = socket.create_connection((where.hostname, where.port or 6379))
        if i < subscribed:
            s.sendall(f"*2\r\n$10\r\nPSUBSCRIBE\r\n${len(PIDBOX)}\r\n{PIDBOX}\r\n".encode())
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    stop_at, received = time.monotonic() + seconds, 0
    while time.monotonic() < stop_at:
        for key, _ in sel.select(timeout=0.5):
            received += len(key.fileobj.recv(65536))  # type: ignore[union-attr]
    for s in socks:
        s.close()
    out.put({"connections": len(socks), "bytes_received": received})


def _flower(url: str, stop: threading.Event, seen: list[int]) -> None:
    """Flower: receives every event (PSUBSCRIBE to the events exchange) and broadcasts
    `enable_events` to every worker's box every 5 s."""
    import redis

    r = redis.Redis.from_url(url)
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.psubscribe("/0.celeryev/*")
    next_broadcast = 0.0
    while not stop.is_set():
        if time.monotonic() >= next_broadcast:
            r.publish(PIDBOX, ENABLE_EVENTS)
            next_broadcast = time.monotonic() + 5
        if sub.get_message(timeout=0.5) is not None:
            seen[0] += 1
    sub.close()
    r.close()


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


def replay(fleet: int, window: float, events_per_s: float, per_worker: int, settle: float = 10.0) -> dict[str, Any]:
    with environment(workers=0, DEEPE_FLEET="large") as ctx:
        r, _ = _clients(ctx["url"])
        empty = r.info("memory")["used_memory"]
        populate(r, fleet)
        per_entry = (r.info("memory")["used_memory"] - empty) / (fleet * POPULATED)
        from deepe_tasks.core import lua, scripts

        for script in (lua.APPEND, lua.RENEW):
            r.script_load(script)
        assert set(scripts.SHAS) >= {lua.APPEND, lua.RENEW}
        results: Any = multiprocessing.get_context("spawn").Queue()
        half = fleet // 2
        gens = [multiprocessing.get_context("spawn").Process(
            target=_generator, args=(ctx["url"], first, count, settle + window + 2, events_per_s, results))
            for first, count in ((0, half), (half, fleet - half))]
        conns = multiprocessing.get_context("spawn").Process(
            target=_connections, args=(ctx["url"], fleet * (per_worker - 1), fleet, settle + window + 2, results))
        started = time.monotonic()
        for g in [*gens, conns]:
            g.start()
        flower_stop, flower_seen = threading.Event(), [0]
        threading.Thread(target=_flower, args=(ctx["url"], flower_stop, flower_seen), daemon=True).start()
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
        load0, w0 = os.getloadavg()[0], time.time()
        figures = measure(r, window)
        w1, load1 = time.time(), os.getloadavg()[0]
        probe_stop.set()
        flower_stop.set()
        got = [results.get(timeout=120) for _ in range(len(gens) + 1)]
        done = [g for g in got if "buckets" in g]
        opened = next(g for g in got if "connections" in g)
        for g in [*gens, conns]:
            g.join(timeout=60)
        elapsed = time.monotonic() - started
    target = fleet * model_ops_per_s(events_per_s)
    achieved = _achieved(done, w0, w1)
    figures.update({
        "simulated_workers": fleet, "events_per_worker_per_s": events_per_s,
        "connections_per_worker": per_worker, "extra_connections_opened": opened["connections"],
        "flower_view_events_received": flower_seen[0],
        # The generators share the machine with Redis: what they reached in the window, against
        # what the model asks for, and what CPU they used to do it (of the whole run).
        "generator_target_calls_per_s": round(target), "generator_calls_per_s_in_window": round(achieved),
        "generator_kept_up": achieved >= 0.95 * target,
        "generator_cpu_pct_of_a_core": round(100 * sum(d["cpu_s"] for d in done) / elapsed, 1),
        "machine_load_1min": [round(load0, 2), round(load1, 2)],
        "probe_rtt_p50_ms": round(percentile(probe, 50), 3),
        "probe_rtt_p99_ms": round(percentile(probe, 99), 3),
        "bytes_per_stream_entry": round(per_entry),
        "projected_memory_mb_streams_at_bound": round(
            (figures["used_memory_mb"] * 2**20 + fleet * (lua.STREAM_MAXLEN - POPULATED) * per_entry) / 2**20),
    })
    return figures


def model_check(measured: dict[str, Any], events_per_s: float, seconds: float = 30.0) -> dict[str, Any]:
    """The replay's model of one worker (1 simulated worker, for ``seconds``) beside phase 2's measure."""
    with environment(workers=0, DEEPE_FLEET="large") as ctx:
        r, _ = _clients(ctx["url"])
        populate(r, 1)
        from deepe_tasks.core import lua

        for script in (lua.APPEND, lua.RENEW):
            r.script_load(script)
        results: Any = multiprocessing.get_context("spawn").Queue()
        g = multiprocessing.get_context("spawn").Process(target=_generator,
                                                         args=(ctx["url"], 0, 1, seconds + 2, events_per_s, results))
        g.start()
        time.sleep(1)
        simulated = measure(r, seconds)
        g.join(timeout=60)
    return {"measured_commands_per_s": measured["commands_per_s"], "model_commands_per_s": simulated["commands_per_s"],
            "measured_by_command": measured["by_command"], "model_by_command": simulated["by_command"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="idle,training,replay", help="which of idle,training,replay to run")
    parser.add_argument("--workers", type=int, default=20, help="real idle workers to start (also N/2 with defaults)")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of each measurement")
    parser.add_argument("--fleet", type=int, default=1000, help="simulated training workers")
    parser.add_argument("--events-per-s", type=float, default=1.0, help="log events per training worker")
    parser.add_argument("--connections-per-worker", type=int, default=9,
                        help="Redis connections a real worker holds (the idle phase's clients / workers)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here (adding to what it holds)")
    smoke_flag(parser, "every phase with 2 idle workers, 20 simulated ones, 2 s windows and 2 s of settling")
    args = parser.parse_args()
    # Settling before the idle workers' and the replay's measures, log events before the training
    # worker's, the model check's seconds.
    settle, replay_settle, logs, check_s = 15.0, 10.0, 5, 30.0
    if args.smoke:
        args.workers, args.window, args.fleet = 2, 2.0, 20
        settle, replay_settle, logs, check_s = 2.0, 2.0, 2, 3.0
    phases = set(args.phases.split(","))
    assert phases <= {"idle", "training", "replay"}, args.phases
    figures: dict[str, Any] = {"command": "bench/fleet.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")}

    def save() -> None:  # after each phase: a run cut short keeps what it measured
        if args.out:
            kept = json.loads(args.out.read_text()) if args.out.exists() else {}
            commands = [c for c in kept.get("commands", []) if c != figures["command"]]
            args.out.write_text(json.dumps({**kept, **figures, "commands": [*commands, figures["command"]]}, indent=1))

    if "idle" in phases:
        n, half = args.workers, max(1, args.workers // 2)
        small_half = idle_workers("small", half, args.window, settle)
        small = idle_workers("small", n, args.window, settle)
        large = idle_workers("large", n, args.window, settle)
        figures.update({
            f"idle_worker_small_profile_{half}_workers": small_half, f"idle_worker_small_profile_{n}_workers": small,
            f"idle_worker_large_profile_{n}_workers": large,
            # Gossip: each worker receives every worker's heartbeats, so what Redis sends each one
            # grows with N (doubling N about doubles it) and the fleet's total with N².
            "small_profile_bytes_out_per_worker_growth":
                f"{half} -> {n} workers: x{small['bytes_out_per_s'] / max(1, small_half['bytes_out_per_s']):.2f}",
            f"small_profile_projected_bytes_out_per_s_at_{args.fleet}": round(
                small["bytes_out_per_s"] * args.fleet / n * args.fleet),
            f"large_profile_projected_bytes_out_per_s_at_{args.fleet}": round(large["bytes_out_per_s"] * args.fleet),
        })
        save()
    if "training" in phases:
        training = training_worker(args.window, logs)
        figures["training_worker_large_profile"] = training
        figures["replay_model_check"] = model_check(training, args.events_per_s, check_s)
        save()
    if "replay" in phases:
        fleet = replay(args.fleet, args.window, args.events_per_s, args.connections_per_worker, replay_settle)
        figures.update({
            f"replay_{args.fleet}_training_workers": fleet,
            "goal": f"{args.fleet} training workers <= 10 % of one Redis core",
            "met": fleet["redis_cpu_pct"] <= 10.0,
            "met_at_full_rate": fleet["generator_kept_up"],
        })
    figures.update(report("fleet", figures, smoke=args.smoke))
    save()


if __name__ == "__main__":
    main()
