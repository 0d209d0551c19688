"""One typed settings object, read from ``DEEPE_*`` environment variables."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPE_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # With Redis Sentinel, DEEPE_REDIS_URL lists the sentinels, as Celery takes them:
    # "sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379/0" (a password in the URL is
    # the Redis servers'); this names the primary they watch, and the sentinels' own password.
    redis_sentinel_master: str | None = None
    redis_sentinel_password: str | None = None
    # A write that must survive a failover (a submit, a claim, a lease renewal, an event, a
    # finish) counts as done only once this many replicas have it (Redis WAIT), within
    # DEEPE_REDIS_REPLICATION_TIMEOUT seconds. Unset: 1 under Sentinel, 0 for a plain URL.
    redis_min_replicas: int | None = Field(None, ge=0)
    redis_replication_timeout: float = Field(2.0, gt=0)
    # For rediss:// URLs: the CA bundle that signed the server's certificate (the system's
    # bundle when unset).
    redis_ca_certs: Path | None = None
    # The shared storage root: models, job folders and checkpoints live under it. A folder
    # (every host mounts it at the same path), or an object store URL such as s3://bucket/prefix
    # (fsspec; credentials and endpoint from the standard AWS variables and files).
    storage: str = "./deepe-data"
    # Where a worker keeps what it fetched from an object store (base models and datasets, keyed
    # by their ETags, least recently used evicted beyond cache_gb) and its local copy of the
    # store's layout (checkpoints before upload, staged models).
    cache_dir: Path = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "deepe"
    cache_gb: float = Field(50.0, gt=0)
    # How long an object store operation that fails in a way that may pass (a cut connection,
    # throttling, a 5xx) is tried again, with backoff, before the attempt fails.
    storage_retry_seconds: float = Field(120.0, ge=0)
    # Webhooks (core/webhooks.py): the URLs every job's state changes are posted to
    # (comma-separated), the Standard Webhooks secret they are signed with (whsec_…), how long a
    # delivery is retried, whether private and loopback addresses may be called, and how long
    # one request may take.
    webhook_urls: str = ""
    webhook_secret: SecretStr | None = None
    webhook_retry_hours: float = Field(24.0, gt=0)
    webhook_allow_private: bool = False
    webhook_timeout: float = Field(10.0, gt=0)
    # MLflow tracking (worker/tracking.py): every job one run in this experiment, fed from its
    # events by the workers; with mlflow_log_model, a succeeded job's model files as artifacts.
    mlflow_uri: str | None = None
    mlflow_experiment: str = "deepe"
    mlflow_log_model: bool = False
    method_store: Path = Path("./method_store")
    queue: str = "gpu"
    # The devices this worker owns, as CUDA_VISIBLE_DEVICES for its jobs (`deepe worker --gpus
    # 0,1,2,3`): it runs jobs of up to that many devices, one rank per device. None: it owns
    # one, and leaves CUDA_VISIBLE_DEVICES alone. Without CUDA the list names CPU ranks (gloo).
    gpus: str | None = None
    # Submit refuses a job that asks for more devices than this; unset, more than the largest
    # worker up now owns (any size is taken while no worker is up: a fleet that starts on demand).
    max_job_gpus: int | None = Field(None, ge=1)
    # Bearer tokens of the HTTP API, comma-separated.
    api_tokens: str = ""
    # Fork job processes from a zygote that has the training stack imported (CUDA untouched);
    # `--no-warm` starts each job process cold.
    warm: bool = True
    # The longest Redis outage a running job rides out; its worker renews the job's lease every
    # third of this (see `lease_key_ms`).
    lease_ttl: float = Field(30.0, gt=1)
    # How long a running job may take to stop after a cancel before it is killed.
    cancel_grace: float = Field(60.0, ge=0)
    # The platform checkpoints a running job this often, whatever the method's save_steps.
    checkpoint_minutes: float = Field(15.0, gt=0)
    # How many times a job may be resumed after losing its worker before it fails.
    max_resumes: int = Field(3, ge=0)
    # An address-space limit for each job process, in GiB (CPU jobs; CUDA needs a large
    # virtual address space, so leave it unset on GPU workers and use the container's limit).
    job_memory_gb: float | None = Field(None, gt=0)
    # Events kept in memory while Redis is unreachable; older ones go to events.jsonl only.
    event_buffer: int = Field(100_000, ge=100)
    # Submit refuses a MODEL_PATH or DATASET_PATH that is not there. A submitter that does not
    # mount the workers' storage sets this to false; the worker then names the missing path.
    check_paths: bool = True
    # Which ended jobs keep their checkpoints (with optimizer state, often larger than the
    # model): "unless-succeeded" deletes them once a model is published; "always" keeps them;
    # "never" deletes them when a job ends in any way. A requeued job always keeps them.
    keep_checkpoints: Literal["unless-succeeded", "always", "never"] = "unless-succeeded"
    # How long Redis keeps an ended job (its record, events, index entries and Celery's result),
    # in seconds from its end; running and queued jobs never expire. The job folder and the
    # model on the shared storage are not touched (see keep_checkpoints).
    job_retention: float = Field(30 * 24 * 3600, ge=1)
    # A worker that exits after one job (`deepe worker --one-job`, for a KEDA ScaledJob), and
    # one that exits after this many seconds without a job (`--idle-exit`).
    one_job: bool = False
    idle_exit: float | None = Field(None, gt=0)
    # Longer than any job: recovery comes from leases, not from broker redelivery.
    visibility_timeout: int = Field(7 * 24 * 3600, ge=60)
    # "large" for fleets of hundreds of workers on one Redis (bench/fleet.py measured why): no
    # gossip (each worker would receive every other worker's events: N² messages) and no
    # mingle, worker heartbeats every 10 s instead of 2 (Flower still shows the workers
    # online), and an idle worker's BRPOP waits 10 s instead of 1. "small" is Celery's defaults.
    fleet: Literal["small", "large"] = "small"
    # Folders outside DEEPE_STORAGE that a job's input paths (MODEL_PATH, DATASET_PATH, any
    # path parameter) may name, comma-separated; anything else outside the storage is refused
    # at submit and again by the worker (a job must not read /etc/shadow through a dataset).
    input_roots: str = ""
    # The HTTP API's limits, applied before a request is parsed: the largest request body (413
    # past it), open event streams per token (429 past it), and how long a client may take to
    # send its request headers or keep an idle connection.
    api_max_body_bytes: int = Field(1 << 20, ge=1024)
    api_max_streams_per_token: int = Field(50, ge=1)
    api_header_timeout: float = Field(10.0, gt=0)
    # How long a worker may take to hand a claimed job to a job process (the spec over the
    # zygote's pipe, the attempt's Redis user) before it kills the process, requeues the job
    # and replaces its zygote.
    handover_timeout: float = Field(60.0, gt=0)
    # A worker whose claimed job makes no progress for this long (its pool process blocked
    # past every bounded wait) exits so that its supervisor restarts it (`watchdog`). Unset:
    # DEEPE_HANDOVER_TIMEOUT + 2 x DEEPE_LEASE_TTL + 60 s.
    stuck_timeout: float | None = Field(None, gt=0)
    # An idle worker whose queues have held a message this long without its Celery consumer
    # taking one (a consumer that reconnected after a broker failover and consumes nothing)
    # exits so that its supervisor restarts it (`watchdog`). A healthy idle worker takes a
    # message within one poll (1 s; 10 s with DEEPE_FLEET=large).
    consumer_stall_timeout: float = Field(60.0, gt=0)

    @property
    def sentinel(self) -> bool:
        return is_sentinel(self.redis_url)

    @property
    def min_replicas(self) -> int:
        """How many replicas must have a write before it counts as done (DEEPE_REDIS_MIN_REPLICAS)."""
        if self.redis_min_replicas is not None:
            return self.redis_min_replicas
        return 1 if self.sentinel else 0

    @property
    def api_token_list(self) -> list[str]:
        return [t.strip() for t in self.api_tokens.split(",") if t.strip()]

    @property
    def redis_call_timeout(self) -> float:
        """How long the worker waits for one lease renewal or cancel read."""
        return min(2.0, max(0.5, self.lease_ttl / 6))

    @property
    def cutoff_s(self) -> float:
        """A worker that has not reached Redis for this long stops its trainer. A call in flight
        when an outage ends can take one more call timeout to fail, so an outage shorter than
        DEEPE_LEASE_TTL never stops a job."""
        return self.lease_ttl + self.redis_call_timeout + 0.5

    @property
    def lease_key_ms(self) -> int:
        """How long Redis keeps a lease after its last renewal: up to a third of the TTL may pass
        between a renewal and the worker's last contact with Redis, then `cutoff_s` until the
        worker stops its trainer, then a third of the TTL for the trainer to reach a step
        boundary before another worker can take the job over."""
        return int((self.lease_ttl / 3 + self.cutoff_s + self.lease_ttl / 3) * 1000)

    @property
    def stuck_after(self) -> float:
        """Seconds without progress on a claimed job after which a worker counts as stuck."""
        if self.stuck_timeout is not None:
            return self.stuck_timeout
        return self.handover_timeout + 2 * self.lease_ttl + 60

    @property
    def input_root_list(self) -> list[Path]:
        return [Path(p.strip()).expanduser().resolve() for p in self.input_roots.split(",") if p.strip()]

    @property
    def webhook_url_list(self) -> list[str]:
        return [u.strip() for u in self.webhook_urls.split(",") if u.strip()]

    @property
    def storage_url(self) -> str | None:
        """The object store's URL (``s3://bucket/prefix``), or None for a folder."""
        return self.storage.rstrip("/") if is_remote(self.storage) else None

    @property
    def storage_root(self) -> Path:
        """The storage folder; on an object store, this machine's local copy of its layout."""
        url = self.storage_url
        if url is None:
            return Path(self.storage).expanduser().resolve()
        digest = hashlib.sha256(url.encode()).hexdigest()[:12]
        return (self.cache_dir.expanduser() / "mirror" / digest).resolve()

    @property
    def method_root(self) -> Path:
        return self.method_store.expanduser().resolve()


def is_remote(storage: str) -> bool:
    """Whether DEEPE_STORAGE names an object store (an fsspec URL other than file://)."""
    head, sep, _ = storage.partition("://")
    return bool(sep) and head.isidentifier() and head.lower() not in ("file", "local")


def is_sentinel(url: str) -> bool:
    """Whether a Redis URL lists sentinels (``sentinel://…``) rather than one server."""
    return url.startswith("sentinel://")


def safe_url(url: str) -> str:
    """A Redis URL with its password masked, for messages and logs (kombu's, as Celery's own
    logs mask it)."""
    from kombu.utils.url import maybe_sanitize_url

    return ";".join(str(maybe_sanitize_url(part)) for part in url.split(";"))


def redis_ssl_options(settings: Settings) -> dict[str, str] | None:
    """TLS options for a rediss:// URL, in the form both redis-py and Celery take."""
    if not settings.redis_url.startswith("rediss://"):
        return None
    options = {"ssl_cert_reqs": "required"}
    if settings.redis_ca_certs is not None:
        options["ssl_ca_certs"] = str(settings.redis_ca_certs)
    return options


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
