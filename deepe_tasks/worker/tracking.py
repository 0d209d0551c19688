"""MLflow tracking, platform-side (``DEEPE_MLFLOW_URI``): every job is one MLflow run, fed from
its event stream, so every method is tracked unchanged.

Each worker registers the jobs it claims (the set ``deepe:mlflow:open``), and one worker at a
time (a lock renewed each round) runs the tracker. Each round it takes the jobs of that set, reads each one's events after the cursor
it keeps in Redis (``deepe:mlflow:<job>``: the run id, the last stream id sent, the furthest step
sent, the attempt it came from and the furthest step of the attempts before it), and sends them with one ``log_batch``: the `log` events' metrics by step, the `eval`
events' (``eval_loss``, ``perplexity``, …), the parameters (secrets masked) and the tags at the
run's start. Only after MLflow took them does the cursor move: a tracking server that is down
costs the job nothing (this is another thread of another process) and loses nothing that the
stream still holds; it is sent when the server returns. A resumed attempt goes on in the same
run (the run id is in Redis, not in a worker); steps that a resume runs again (after the last
checkpoint) are not sent twice, even when both attempts' events come in one batch. Once a job has ended and its events are sent, the run is ended
with the job's status and the model's location (and, with ``DEEPE_MLFLOW_LOG_MODEL=true``, the
model's files as artifacts, fetched from the object store where the model is published on one).
An evaluation job (`deepe eval`) logs its metrics into the run of the job it evaluated, as
``eval/<dataset>/<metric>``. This run is tagged ``deepe.source=platform``; a method that sets
``report_to="mlflow"`` itself makes a separate run of its own, tagged ``deepe.source=method`` and
``deepe.job_id`` (`job/mlflow_env.py`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from deepe_tasks.core import keys
from deepe_tasks.core.events import decode
from deepe_tasks.core.fences import MANIFEST
from deepe_tasks.core.records import EventKind, JobKind, JobRecord, JobStatus, mask_secrets
from deepe_tasks.core.settings import Settings

log = logging.getLogger(__name__)

OPEN = f"{keys.PREFIX}:mlflow:open"  # set: jobs whose run is not ended yet
LOCK = f"{keys.PREFIX}:mlflow:lock"
LOCK_MS = 15_000
BATCH = 500  # events read per job per round (MLflow takes at most 1000 metrics per batch)
ENDED_STATUS = {JobStatus.SUCCEEDED: "FINISHED", JobStatus.FAILED: "FAILED", JobStatus.CANCELLED: "KILLED"}
_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def state_key(job_id: str) -> str:
    return f"{keys.PREFIX}:mlflow:{job_id}"


def metric_name(name: str) -> str:
    return _KEY.sub("_", name)[:250]


class Tracker:
    """Feeds MLflow from the event streams; ``client``: an MlflowClient (or one that acts so)."""

    def __init__(self, redis_client: redis.Redis, settings: Settings, holder: str, client: Any = None) -> None:
        self.redis, self.settings, self.holder = redis_client, settings, holder
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=settings.mlflow_uri)
        self.client = client
        self._experiment: str | None = None

    def _lead(self) -> bool:
        if self.redis.set(LOCK, self.holder, px=LOCK_MS, nx=True):
            return True
        if self.redis.get(LOCK) == self.holder:
            self.redis.pexpire(LOCK, LOCK_MS)
            return True
        return False

    def experiment(self) -> str:
        if self._experiment is None:
            name = self.settings.mlflow_experiment
            found = self.client.get_experiment_by_name(name)
            self._experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
        return self._experiment

    def round(self) -> int:
        """One round over the jobs whose runs are open (registered at their claim); how many metrics it sent."""
        if not self._lead():
            return 0
        opened: Any = self.redis.smembers(OPEN)
        sent = 0
        for job_id in sorted(opened):
            try:
                sent += self.feed(str(job_id))
            except Exception as e:  # MLflow away, a job gone: the next round tries again
                log.warning("mlflow: job %s: %s", job_id, e)
        return sent

    def feed(self, job_id: str) -> int:
        raw: Any = self.redis.hgetall(keys.job(job_id))
        if not raw:
            self.redis.srem(OPEN, job_id)
            return 0
        record = JobRecord.from_redis(raw)
        if record.kind is JobKind.MERGE:
            self.redis.srem(OPEN, job_id)
            return 0
        state: Any = self.redis.hgetall(state_key(job_id))
        if record.kind is JobKind.EVAL:
            if not record.status.is_final:
                self.redis.sadd(OPEN, job_id)  # seen running: looked at again once it ended
                return 0
            return self._evaluation(record)
        run_id = state.get("run") or self._start(record)
        cursor, step_now = state.get("cursor", "0"), int(state.get("step", 0))
        # A resumed attempt trains again the steps after its checkpoint: those up to `upto` (the
        # furthest step of the attempts before it) are not sent twice, in one batch or across batches.
        attempt, upto = int(state.get("attempt", 0)), int(state.get("upto", 0))
        entries: Any = self.redis.xrange(keys.events(job_id), min=f"({cursor}" if cursor != "0" else "-", count=BATCH)
        metrics = []
        for entry_id, event in decode(entries):
            cursor = entry_id
            if event is None or event.step is None or event.kind not in (EventKind.LOG, EventKind.EVAL):
                continue
            if (event.attempt or 0) > attempt:
                attempt, upto = event.attempt or 0, step_now
            if event.step <= upto:
                continue  # run again after a resume: sent already
            at = int(event.ts * 1000)
            for name, value in event.metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    metrics.append((metric_name(name), float(value), at, int(event.step)))
            step_now = max(step_now, event.step)
        if metrics:
            from mlflow.entities import Metric

            self.client.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in metrics])
        self.redis.hset(state_key(job_id), mapping={"cursor": cursor, "step": step_now, "attempt": attempt,
                                                    "upto": upto})
        if record.status.is_final and len(entries) < BATCH:
            self._end(record, run_id)
        return len(metrics)

    def _start(self, record: JobRecord) -> str:
        from mlflow.entities import Param, RunTag

        tags = {"deepe.job_id": record.id, "deepe.method": record.method, "deepe.method_sha256": record.method_sha256,
                "deepe.queue": record.queue, "deepe.devices": str(record.gpus), "deepe.worker": record.worker or "",
                "mlflow.runName": record.id, "deepe.source": "platform"}
        run = self.client.create_run(self.experiment(), start_time=int(record.submitted_at * 1000), tags=tags)
        params = [Param(metric_name(k), json.dumps(v, default=str)[:6000] if not isinstance(v, str) else v[:6000])
                  for k, v in sorted(mask_secrets(record.params).items())]
        if params:
            self.client.log_batch(run.info.run_id, params=params[:100], tags=[RunTag("deepe.attempts", str(record.attempts))])
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(state_key(record.id), mapping={"run": run.info.run_id, "cursor": "0", "step": 0})
        pipe.expire(state_key(record.id), int(self.settings.job_retention))
        pipe.sadd(OPEN, record.id)
        link = f"{self.settings.mlflow_uri}/#/experiments/{self.experiment()}/runs/{run.info.run_id}"
        pipe.hset(keys.job(record.id), mapping={"mlflow_run": run.info.run_id, "mlflow_url": link})
        pipe.execute()
        return str(run.info.run_id)

    def _end(self, record: JobRecord, run_id: str) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag("deepe.status", record.status.value), RunTag("deepe.attempts", str(record.attempts)),
                RunTag("deepe.worker", record.worker or "")]
        if record.status is JobStatus.SUCCEEDED:
            tags.append(RunTag("deepe.model", record.output_dir))
        self.client.log_batch(run_id, tags=tags)
        if self.settings.mlflow_log_model and record.status is JobStatus.SUCCEEDED:
            self._log_model(record, run_id)
        self.client.set_terminated(run_id, status=ENDED_STATUS.get(record.status, "FINISHED"),
                                   end_time=int((record.finished_at or time.time()) * 1000))
        self.redis.srem(OPEN, record.id)

    def _log_model(self, record: JobRecord, run_id: str) -> None:
        """The published model's files as the run's artifacts (``model/``): a folder as it is; on
        an object store, fetched first (to DEEPE_CACHE_DIR) from where its deepe.json says."""
        if "://" not in record.output_dir:
            if Path(record.output_dir).is_dir():
                self.client.log_artifacts(run_id, record.output_dir, artifact_path="model")
            return
        scratch = Path(self.settings.cache_dir).expanduser() / "mlflow"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch, prefix=f"{record.id}-") as folder:
            if fetch_published(record.output_dir, Path(folder)):
                self.client.log_artifacts(run_id, folder, artifact_path="model")
            else:
                log.warning("mlflow: job %s: no model is published at %s (no %s there); none is logged",
                            record.id, record.output_dir, MANIFEST)

    def _evaluation(self, record: JobRecord) -> int:
        """An evaluation job, once it ended: its metrics (if it succeeded) into the evaluated job's run."""
        target: Any = self.redis.hget(state_key(str(record.params.get("EVALUATED"))), "run")
        self.redis.srem(OPEN, record.id)
        if record.status is not JobStatus.SUCCEEDED or not target:
            return 0
        from mlflow.entities import Metric

        on = record.params.get("DATASET_PATH") or record.params.get("LM_EVAL_TASK")  # a dataset, or a task file alone
        dataset = metric_name(Path(str(on)).stem)
        at = int((record.finished_at or time.time()) * 1000)
        metrics = [Metric(f"eval/{dataset}/{metric_name(k)}", float(v), at, 0) for k, v in record.metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        self.client.log_batch(str(target), metrics=metrics)
        return len(metrics)


def fetch_published(url: str, into: Path) -> bool:
    """Fetch the model published at ``url`` on an object store into ``into``: its ``deepe.json``
    and the files under the key it names (a model exists iff its deepe.json does). False if none."""
    from deepe_tasks.core.objects import ObjectStore

    protocol, rest = url.rstrip("/").split("://", 1)
    bucket, _, rel = rest.partition("/")
    store = ObjectStore(f"{protocol}://{bucket}")
    manifest = store.read_bytes(f"{rel}/{MANIFEST}")
    files = _files_of(manifest)
    if manifest is None or files is None:
        return False
    store.get(f"{rel}/{files}", into)
    (into / MANIFEST).write_bytes(manifest)
    return True


def _files_of(manifest: bytes | None) -> str | None:
    try:
        files = json.loads(manifest).get("files") if manifest is not None else None
    except (ValueError, AttributeError):
        return None
    return files if isinstance(files, str) and files else None


def run_tracker(stop: threading.Event, client_factory: Any, settings: Settings, holder: str,
                interval: float = 2.0) -> None:
    """A worker's tracker thread: a round every ``interval`` seconds while this worker leads."""
    # MLflow's own client retries for minutes by default: a round must fail fast and try again.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    tracker: Tracker | None = None
    while not stop.wait(interval):
        try:
            if tracker is None:
                tracker = Tracker(client_factory(), settings, holder)
            tracker.round()
        except Exception as e:
            log.warning("mlflow: %s", e)


def register(redis_client: redis.Redis, job_id: str) -> None:
    """A job this worker claimed is tracked until its run ends, whatever happens to the worker
    or to MLflow meanwhile (called at each claim where DEEPE_MLFLOW_URI is set)."""
    redis_client.sadd(OPEN, job_id)
