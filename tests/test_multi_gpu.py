"""Multi-device jobs on CPU ranks (gloo): `deepe worker --gpus 0,1` runs a 2-rank DDP job.

Real workers, real zygotes, real ranks, real TRL trainers; faults are real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepe_tasks import Event, EventKind, Job, JobStatus, submit
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.fixtures.embedded import free_port
from tests.helpers import SLOW_METHOD, TRL_SNIPPET, Worker, wait_for, write_method

pytestmark = pytest.mark.e2e

# Short leases and frequent checkpoints, so that faults are noticed in seconds; a long grace, so
# that a job that stops by itself is told from one that was killed after the grace.
FAST = {"DEEPE_LEASE_TTL": "3", "DEEPE_CHECKPOINT_MINUTES": "0.02", "DEEPE_CANCEL_GRACE": "60"}
# The same seed before the model is built, so that deepe's run and torchrun's start alike.
SEEDED = "from transformers import set_seed\nset_seed(0)\n" + TRL_SNIPPET
SLOW_DDP = SLOW_METHOD.replace("from datasets import load_dataset", "from datasets import load_dataset\n"
                               "from transformers import set_seed\nset_seed(0)")


@pytest.fixture(scope="module", autouse=True)
def methods(store: Path) -> None:
    write_method(store, "seeded", SEEDED)
    write_method(store, "slowddp", SLOW_DDP)


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    from deepe_tasks.core.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def params(sft_params: dict[str, object]) -> dict[str, object]:
    return {**sft_params, "BATCH_SIZE": 2, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}


def start(workers: list[Worker], queue: str, tmp_path: Path, gpus: str, **env: str) -> Worker:
    w = Worker(queue, tmp_path / f"worker-{len(workers)}.log", extra_args=["--gpus", gpus],
               env={**FAST, **env}).start()
    workers.append(w)
    return w


def losses(job: Job) -> list[tuple[int, float]]:
    return [(e.step or 0, e.metrics["loss"]) for e in job.events() if e.kind is EventKind.LOG and "loss" in e.metrics]


def processes() -> Iterator[tuple[int, str, int, int]]:
    """Every process now: (pid, state, parent pid, process group), from /proc/*/stat."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        yield int(stat.parent.name), state, int(ppid), int(pgrp)


def group_alive(pgid: int) -> bool:
    """Whether any process of the job's process group (its ranks, their helpers) is still running."""
    return any(pgrp == pgid and state != "Z" for _, state, _, pgrp in processes())


def ranks_of(pgid: int) -> list[int]:
    """The pids of rank 0's forked ranks: its children in its process group."""
    return [pid for pid, _, ppid, pgrp in processes() if ppid == pgid and pgrp == pgid]


def steps_after_resume(job: Job) -> tuple[list[Event], list[int | None]]:
    """The job's `resumed` events, and the steps it logged a loss for from the first of them on."""
    events = list(job.events())
    resumed = [e for e in events if e.kind is EventKind.RESUMED]
    after = [e.step for e in events[events.index(resumed[0]):] if e.kind is EventKind.LOG and "loss" in e.metrics]
    return resumed, after


def wait_steps(job: Job, steps: int, timeout: float = 120) -> None:
    wait_for(lambda: len(losses(job)) >= steps or job.status().is_final, timeout=timeout)
    assert len(losses(job)) >= steps, job.info()


TORCHRUN_SCRIPT = '''
import json, sys
from transformers import TrainerCallback

class Losses(TrainerCallback):
    def __init__(self):
        self.losses = []
    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and "loss" in (logs or {}):
            self.losses.append([state.global_step, logs["loss"]])

params = json.loads(sys.argv[2])
callback = Losses()
namespace = {**params, "params": params, "callback": callback}
exec(open(sys.argv[1]).read(), namespace)
namespace["trainer"].train()
if namespace["trainer"].is_world_process_zero():
    open(sys.argv[3], "w").write(json.dumps(callback.losses))
'''


def test_a_two_rank_job_trains_as_one_and_matches_a_plain_torchrun(
        workers: list[Worker], tmp_path: Path, params: dict[str, object], store: Path) -> None:
    # Given a worker that owns two (CPU) devices
    start(workers, "mgpu", tmp_path, "0,1")
    # When a job asks for both
    job = submit("seeded", {**params, "MAX_STEPS": 6}, queue="mgpu", gpus=2)
    assert job.info()["route"] == "mgpu.2gpus"
    # Then it succeeds, on two ranks, with one voice: one loss per step, one model
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    events = list(job.events())
    started = [e for e in events if e.kind is EventKind.STARTED]
    assert len(started) == 1 and started[0].metrics["world_size"] == 2
    ours = losses(job)
    assert [step for step, _ in ours] == [1, 2, 3, 4, 5, 6]
    out = Path(job.info()["output_dir"])
    manifest = json.loads((out / "deepe.json").read_text())
    assert manifest["job"] == job.id and manifest["steps"] == 6
    assert (out / "adapter_model.safetensors").exists()
    assert not [p for p in out.parent.iterdir() if job.id in p.name and p != out]  # published once
    # And its loss curve is the one a plain `torchrun --nproc_per_node 2` of the same code draws
    script = tmp_path / "plain.py"
    script.write_text(TORCHRUN_SCRIPT)
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SEEDED)
    result = tmp_path / "torchrun.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPE_")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), str(script), str(snippet), json.dumps({**params, "MAX_STEPS": 6}), str(result)],
                   check=True, cwd=tmp_path, env=env, timeout=300, capture_output=True)
    theirs = json.loads(result.read_text())
    assert [s for s, _ in theirs] == [s for s, _ in ours]
    assert [loss for _, loss in ours] == pytest.approx([loss for _, loss in theirs], rel=1e-4)


def test_a_two_device_job_lands_on_the_worker_that_owns_two(workers: list[Worker], tmp_path: Path,
                                                           params: dict[str, object]) -> None:
    # Given a worker with one device and a worker with two, on the same queue
    small = start(workers, "mroute", tmp_path, "0")
    large = start(workers, "mroute", tmp_path, "0,1")
    # When 2-device jobs and 1-device jobs are submitted together
    twos = [submit("seeded", {**params, "MAX_STEPS": 2}, queue="mroute", gpus=2) for _ in range(3)]
    ones = [submit("seeded", {**params, "MAX_STEPS": 2}, queue="mroute") for _ in range(3)]
    # Then every job runs, and every 2-device job on the worker that owns two
    for job in twos + ones:
        assert job.wait(timeout=240) is JobStatus.SUCCEEDED, job.info()["error"]
    assert {j.info()["worker"] for j in twos} == {large.hostname}
    assert all(e.metrics["world_size"] == 1 for j in ones for e in j.events() if e.kind is EventKind.STARTED)
    # And `deepe queues` (and Flower, from the same active_queues) shows who consumes which size
    from deepe_tasks.core.broker import app
    from deepe_tasks.queue.queues import overview

    active = app.control.inspect(timeout=2.0).active_queues() or {}
    assert [q["name"] for q in active[large.hostname]] == ["mroute.2gpus", "mroute"]
    assert [q["name"] for q in active[small.hostname]] == ["mroute"]
    from deepe_tasks.core import devices
    from deepe_tasks.core.connection import get_redis

    registered = {w: (n, q) for w, n, _, q in devices.live(get_redis(), stale_after=90)}
    assert registered[large.hostname] == (2, ["mroute"]) and registered[small.hostname] == (1, ["mroute"])
    infos = {i.name: i for i in overview(get_redis(), active)}
    assert infos["mroute.2gpus"].gpus == 2 and infos["mroute.2gpus"].workers == [large.hostname]
    assert sorted(infos["mroute"].workers) == sorted([small.hostname, large.hostname])

    # And a job larger than any worker up now is refused at submit, naming the largest
    with pytest.raises(InvalidParams, match=r"asks for 3 devices .* the largest worker of queue 'mroute' up now .* owns 2"):
        submit("seeded", params, queue="mroute", gpus=3)


def test_a_cancel_stops_every_rank_at_the_same_step(workers: list[Worker], tmp_path: Path,
                                                    params: dict[str, object], storage: Path) -> None:
    start(workers, "mcancel", tmp_path, "0,1")
    job = submit("slowddp", {**params, "MAX_STEPS": 200}, queue="mcancel", gpus=2)
    wait_steps(job, 3)
    pgid = job.info()["pid"]
    assert len(ranks_of(pgid)) == 1  # rank 1, forked from rank 0
    asked = time.monotonic()
    job.cancel()
    assert job.wait(timeout=60) is JobStatus.CANCELLED
    # It stopped by itself at a step boundary (no kill after the 60 s grace), every rank with it
    assert time.monotonic() - asked < 30
    final = list(job.events())[-1]
    assert "cancelled at step" in final.message, final.message
    step = int(final.message.split("cancelled at step ")[1].split()[0])
    checkpoint = storage / "jobs" / job.id / "attempts" / "1" / "checkpoints" / f"checkpoint-{step}"
    # Both ranks reached the stop at that step: each wrote its part of the one checkpoint
    assert (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists()
    assert (checkpoint / "deepe-checkpoint.json").exists()
    wait_for(lambda: not group_alive(pgid), timeout=10)


def test_the_time_limit_stops_every_rank(workers: list[Worker], tmp_path: Path, params: dict[str, object]) -> None:
    start(workers, "mlimit", tmp_path, "0,1")
    job = submit("slowddp", {**params, "MAX_STEPS": 500}, queue="mlimit", gpus=2, time_limit=8)
    assert job.wait(timeout=90) is JobStatus.FAILED
    error = job.info()["error"]
    assert "time limit of 8 s reached at step" in error and "killed" not in error, error
    wait_for(lambda: not group_alive(job.info()["pid"]), timeout=10)


def test_sigterm_preempts_every_rank_and_the_job_resumes_under_ddp(
        workers: list[Worker], tmp_path: Path, params: dict[str, object]) -> None:
    first = start(workers, "mterm", tmp_path, "0,1")
    job = submit("slowddp", {**params, "MAX_STEPS": 14}, queue="mterm", gpus=2)
    wait_steps(job, 4)
    pgid = job.info()["pid"]
    first.process.signal(signal.SIGTERM)
    first.process.proc.wait(timeout=60)  # type: ignore[union-attr]
    assert job.status() is JobStatus.QUEUED and job.info()["losses"] == 0
    assert not group_alive(pgid)
    checkpoint = [e.step for e in job.events() if e.kind is EventKind.CHECKPOINT][-1]

    start(workers, "mterm", tmp_path, "0,1")
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    resumed, after = steps_after_resume(job)
    assert [e.step for e in resumed] == [checkpoint]
    assert after == list(range((checkpoint or 0) + 1, 15))  # one voice after the resume too
    assert [e.metrics["world_size"] for e in job.events() if e.kind is EventKind.STARTED] == [2, 2]


def test_a_rank_killed_ends_every_rank_and_the_job_names_it(
        workers: list[Worker], tmp_path: Path, params: dict[str, object]) -> None:
    w = start(workers, "mkill", tmp_path, "0,1")
    job = submit("slowddp", {**params, "MAX_STEPS": 200}, queue="mkill", gpus=2)
    wait_steps(job, 3)
    pgid = job.info()["pid"]
    [rank1] = ranks_of(pgid)
    killed = time.monotonic()
    os.kill(rank1, signal.SIGKILL)
    assert job.wait(timeout=60) is JobStatus.FAILED
    assert time.monotonic() - killed < 20  # within seconds, not a collective's half-hour timeout
    error = job.info()["error"]
    assert "Rank 1 of 2 was killed by SIGKILL" in error, error
    wait_for(lambda: not group_alive(pgid), timeout=10)
    # The worker lives on, and runs the next 2-rank job
    assert w.alive()
    again = submit("seeded", {**params, "MAX_STEPS": 2}, queue="mkill", gpus=2)
    assert again.wait(timeout=120) is JobStatus.SUCCEEDED, again.info()["error"]


def test_a_killed_worker_s_ddp_job_resumes_from_its_checkpoint_under_ddp(
        workers: list[Worker], tmp_path: Path, params: dict[str, object]) -> None:
    first = start(workers, "mlost", tmp_path, "0,1")
    job = submit("slowddp", {**params, "MAX_STEPS": 16}, queue="mlost", gpus=2)
    wait_for(lambda: any(e.kind is EventKind.CHECKPOINT for e in job.events()), timeout=120)
    pgid = job.info()["pid"]
    first.process.signal(signal.SIGKILL, group=True)
    first.process.proc.wait()  # type: ignore[union-attr]
    wait_for(lambda: not group_alive(pgid), timeout=10)  # its ranks died with it

    start(workers, "mlost", tmp_path, "0,1")
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    resumed, after = steps_after_resume(job)
    assert len(resumed) == 1 and (resumed[0].step or 0) >= 1
    assert after == list(range((resumed[0].step or 0) + 1, 17))
    assert job.info()["losses"] == 1 and job.info()["attempts"] == 2


def test_fsdp_on_a_worker_without_cuda_is_a_clear_error(workers: list[Worker], tmp_path: Path, store: Path,
                                                        params: dict[str, object]) -> None:
    # On CPU ranks accelerate drops FSDP without a word: each rank would hold the whole model
    write_method(store, "sharded", TRL_SNIPPET.replace('use_cpu=True', 'use_cpu=True, fsdp=True'))
    w = start(workers, "mfsdp", tmp_path, "0,1")
    job = submit("sharded", params, queue="mfsdp", gpus=2)
    assert job.wait(timeout=120) is JobStatus.FAILED
    error = job.info()["error"]
    assert "asks for FSDP" in error and "needs CUDA devices" in error, error
    assert "remove fsdp from the config to train with DDP" in error
    # (every rank fails alike; whichever reports first, its error is this one)
    assert w.alive()


def test_a_worker_given_a_queue_too_large_by_hand_hands_the_job_back_and_loses_nothing(
        workers: list[Worker], tmp_path: Path, params: dict[str, object], monkeypatch: pytest.MonkeyPatch,
        fresh_settings: None) -> None:
    monkeypatch.setenv("DEEPE_MAX_JOB_GPUS", "2")  # a 2-device worker comes later: submit must not refuse
    # Given a plain Celery worker of one device, told by hand to consume the 2-device queue
    name = f"misrouted-{os.getpid()}@%h"
    wrong = Worker("mmis.2gpus", tmp_path / "wrong.log", env=FAST, command=[
        sys.executable, "-m", "celery", "-A", "deepe_tasks", "worker", "-Q", "mmis.2gpus", "--hostname", name])
    wrong.process.name = name
    workers.append(wrong.start())
    # When a 2-device job arrives, it is not claimed there: it goes back to its queue
    job = submit("seeded", {**params, "MAX_STEPS": 2}, queue="mmis", gpus=2)
    wait_for(lambda: "needs 2 devices and this worker" in wrong.log(), timeout=60)
    assert job.status() is JobStatus.QUEUED and job.info()["attempts"] == 0
    # And a worker that owns two runs it, as its first and only attempt
    wrong.stop()
    start(workers, "mmis", tmp_path, "0,1")
    assert job.wait(timeout=120) is JobStatus.SUCCEEDED, job.info()["error"]
    assert job.info()["attempts"] == 1 and job.info()["losses"] == 0
