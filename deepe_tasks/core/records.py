"""The wire vocabulary: job states, event kinds, events and the job record."""

from __future__ import annotations

import json
import re
import time
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field


class Word(str, Enum):
    """A string enum that reads as its value in messages (f"{Phase.TRAINING}" is "training")."""

    def __str__(self) -> str:
        return str(self.value)


class JobKind(Word):
    """What a job does: train runs its method; merge folds a finished job's adapter into its base;
    eval scores a model on a dataset (`job/evaljob.py`)."""

    TRAIN = "train"
    MERGE = "merge"
    EVAL = "eval"


# The method name a merge job is recorded under: it has no file, its code is job/merge.py.
MERGE_METHOD = "merge"
EVAL_METHOD = "eval"


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class EventKind(str, Enum):
    # lifecycle
    QUEUED = "queued"
    STARTED = "started"
    # phases
    LOADING_MODEL = "loading_model"
    LOADING_DATASET = "loading_dataset"
    TRAINING = "training"
    SAVING = "saving"
    # progress
    LOG = "log"
    EVAL = "eval"  # an evaluation on the held-out data: eval_loss, perplexity, ... at its step
    CHECKPOINT = "checkpoint"
    # outcomes
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REQUEUED = "requeued"
    RESUMED = "resumed"

    @property
    def is_final(self) -> bool:
        return self in (EventKind.SUCCEEDED, EventKind.FAILED, EventKind.CANCELLED)


class Phase(Word):
    """What an attempt was doing: named in a failure ("Failed while loading the dataset")."""

    PREPARING = "preparing the job folder"
    LOADING_METHOD = "loading the method"
    BUILDING_MODEL = "building the model"
    LOADING_DATASET = "loading the dataset"
    BUILDING_TRAINER = "building the trainer"
    TRAINING = "training"
    SAVING = "saving"
    RUNNING = "running the job process"  # the process died outside any phase it reported

    @property
    def event(self) -> EventKind | None:
        """The event that announces this phase in the job's stream, if it has one."""
        return _PHASE_EVENTS.get(self)


_PHASE_EVENTS = {
    Phase.BUILDING_MODEL: EventKind.LOADING_MODEL,
    Phase.LOADING_DATASET: EventKind.LOADING_DATASET,
    Phase.TRAINING: EventKind.TRAINING,
    Phase.SAVING: EventKind.SAVING,
}


class StopReason(Word):
    """Why an attempt was asked to stop before its method ended."""

    CANCEL = "cancel"
    CANCEL_SAVE = "cancel-save"  # cancel, and publish the model as it is
    PREEMPT = "preempt"  # the worker is shutting down: checkpoint, to be resumed
    CUT_OFF = "cut-off"  # the worker lost Redis for a lease TTL: checkpoint, to be resumed
    TIME_LIMIT = "time-limit"
    FENCED = "fenced"  # another attempt owns the job (the worker's word only: the job is killed)


class Event(BaseModel):
    """One entry of a job's event stream; ``id`` is the Redis stream id once stored."""

    kind: EventKind
    job: str
    ts: float = Field(default_factory=time.time)
    step: int | None = None
    max_steps: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    message: str = ""
    eta_s: float | None = None
    attempt: int | None = None  # the attempt that wrote it; None for events before the first
    id: str | None = None

    def to_json(self) -> str:
        return self.model_dump_json(exclude={"id"})

    @classmethod
    def from_json(cls, data: str | bytes, id: str | None = None) -> Event:
        try:
            event = cls.model_validate_json(data)
        except ValueError:
            # Its JSON may carry a lone surrogate ("\udc80"), which pydantic's parser refuses
            # while json's reads it: read it that way, with the surrogate made readable.
            event = cls.model_validate(readable(json.loads(data)))
        event.id = id
        return event


_JSON_FIELDS = ("params", "metrics")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# How a surrogate looks in JSON text (json.dumps escapes every non-ASCII character): only a
# field that holds one is walked. Redis hands back only whole UTF-8, so no other field can.
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def readable(value: Any) -> Any:
    """``value`` with every lone surrogate (in strings and names, however deep) replaced by
    U+FFFD: what a record or event written before submit refused them reads as, so that no
    answer, and no job spec, fails to serialise it."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {readable(k): readable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [readable(v) for v in value]
    return value


class JobRecord(BaseModel):
    """What Redis keeps about a job, in the hash ``deepe:job:<id>``."""

    id: str
    method: str
    method_sha256: str
    params: dict[str, Any]
    output_dir: str
    queue: str
    priority: int | None = None
    gpus: int = 1  # devices the job trains on, one rank each
    kind: JobKind = JobKind.TRAIN
    route: str | None = None  # the Celery queue its message goes to (devices.route); None: ``queue``
    status: JobStatus = JobStatus.QUEUED
    error: str | None = None
    worker: str | None = None
    submitted_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    attempts: int = 0
    # Attempts lost without being told to stop (killed, crashed, cut off from Redis): what
    # DEEPE_MAX_RESUMES counts. A preemption announced by SIGTERM is not one.
    losses: int = 0
    time_limit: float | None = None
    pid: int | None = None
    webhook: str | None = None  # a URL of the job's own that its state changes are posted to (core/webhooks.py)
    # Its MLflow run (DEEPE_MLFLOW_URI), and the page of that run: written by the worker's tracker.
    mlflow_run: str | None = None
    mlflow_url: str | None = None

    def to_redis(self) -> dict[str, str]:
        return {
            key: self.to_redis_value(key, value)
            for key, value in self.model_dump(mode="json").items()
            if value is not None
        }

    @staticmethod
    def to_redis_value(key: str, value: Any) -> str:
        return json.dumps(value) if key in _JSON_FIELDS else str(value)

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> JobRecord:
        data: dict[str, Any] = dict(raw)
        for key in _JSON_FIELDS:
            if key in data:
                text = data[key]
                data[key] = json.loads(text)
                if _ESCAPED_SURROGATE.search(text):
                    data[key] = readable(data[key])
        return cls.model_validate(data)


class JobSpec(BaseModel):
    """Everything a job process needs to run one attempt; sent to it on stdin."""

    job_id: str
    method: str
    method_sha256: str
    source: str
    params: dict[str, Any]
    storage_root: str
    attempt: int = 1  # the fencing token: every write of this attempt carries it
    # What fences the attempt on the storage side, where Redis cannot (a failover that rolled
    # back a claim): its claim's unique id, and the job's submit time (which job of the id).
    claim: str = ""
    submitted_at: float | None = None
    # The worker's DEEPE_REDIS_MIN_REPLICAS and DEEPE_REDIS_REPLICATION_TIMEOUT: the job process
    # does not see the worker's DEEPE_REDIS_URL (it holds its password), from which the first
    # is derived, and its events and publish check must be acknowledged alike.
    min_replicas: int = 0
    replication_timeout: float = 2.0
    lease_ttl: float = 30.0
    # The attempt's own Redis credential (docs/reliability.md, "What a method can reach").
    redis_url: str | None = None
    redis_username: str | None = None
    redis_password: str | None = None
    worker: str = ""
    started_at: float = Field(default_factory=time.time)
    time_limit: float | None = None
    checkpoint_minutes: float | None = None
    event_buffer: int = 100_000  # DEEPE_EVENT_BUFFER: events held in memory while Redis is away
    kind: JobKind = JobKind.TRAIN  # JobRecord.kind: a merge runs job/merge.py instead of a method
    world_size: int = 1  # the job's ranks: this process is rank 0 and starts the others (job/ranks.py)
    # The folders besides the storage that the job's input paths may name (DEEPE_INPUT_ROOTS);
    # None sets no bound (run-local, which reads with its caller's own rights).
    input_roots: list[str] | None = None
    # An object store (DEEPE_STORAGE=s3://…): its URL (storage_root is then the worker's local
    # copy of its layout), and the worker's cache of what jobs read from it (`job/remote.py`).
    storage_url: str | None = None
    cache_dir: str | None = None
    cache_gb: float = 50.0


class RunResult(BaseModel):
    """How one attempt ended, written by the job process to ``result.json``.

    ``status`` is ``queued`` when the attempt stopped at a checkpoint to be resumed elsewhere.
    """

    status: JobStatus
    phase: Phase | None = None
    error: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    output_dir: str | None = None
    step: int | None = None


# Parameter names whose values are secrets: masked wherever a record is shown (Flower, the API,
# deepe.json).
SECRET_KEY = re.compile(r"token|secret|password|passwd|key", re.IGNORECASE)
MASK = "***"


def mask_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """A copy with the values of secret-looking keys (token, secret, password, key) masked."""
    return {k: MASK if SECRET_KEY.search(k) and v not in (None, "") else _mask_nested(v) for k, v in values.items()}


def _mask_nested(value: Any) -> Any:
    if isinstance(value, dict):
        return mask_secrets(value)
    if isinstance(value, list):
        return [_mask_nested(v) for v in value]
    return value
