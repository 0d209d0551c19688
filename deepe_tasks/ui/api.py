"""The HTTP API (`deepe api`): the Python client over HTTP, for backends in any language.

It has no logic of its own: every route calls the same client code as `deepe_tasks.submit`.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.errors import (
    BrokerUnavailable,
    DeepeError,
    InvalidJobState,
    JobExists,
    JobNotFound,
    MethodNotFound,
)
from deepe_tasks.core.records import Event, JobRecord, JobStatus
from deepe_tasks.core.settings import get_settings
from deepe_tasks.queue import client
from deepe_tasks.queue.methods import Method, describe_method, list_methods, load_method

log = logging.getLogger(__name__)


class SubmitRequest(BaseModel):
    method: str = Field(description="A method name in the method store, such as sft-demo.")
    params: dict[str, Any] = Field(description="Parameters: MODEL_PATH, DATASET_PATH, ... and custom keys.")
    queue: str | None = Field(None, description="The queue; DEEPE_QUEUE when absent.")
    priority: int | None = Field(None, description="0 (highest) to 9.")
    time_limit: float | None = Field(None, description="Seconds an attempt may train.")
    check: bool = Field(True, description="Refuse a method that the static check rejects; false for code it misreads.")
    gpus: int = Field(1, strict=True, description=(
        "Devices the job trains on, one rank each (DDP); refused when no worker owns that many."))


class JobRef(BaseModel):
    id: str
    status: JobStatus


class Submitted(JobRef):
    custom_params: list[str] = Field(default_factory=list, description=(
        "The keys that are no parameter of the platform or the method, passed on as they are."))


class JobInfo(JobRecord):
    """The job record (secrets masked) and its latest progress."""

    progress: Event | None = Field(None, description="The latest `log` event: step, max_steps, ETA, metrics.")


class JobList(BaseModel):
    jobs: list[JobInfo]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


class ParamInfo(BaseModel):
    name: str
    type: str
    default: Any = None
    help: str
    declared_by: str = Field(description="`platform`, or `method` for one the method declares in METHOD_PARAMS.")


class MethodInfo(BaseModel):
    name: str
    kind: str = Field(description="`built-in`, or `store` for one in DEEPE_METHOD_STORE.")
    file_kind: str = Field(description="`deepe`, or `DeepExtension` for a DeepExtension custom method.")
    description: str
    sha256: str
    params: list[ParamInfo]
    source: str


class Health(BaseModel):
    redis: bool
    workers: int


class Error(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "No token, or a wrong one."},
    404: {"model": Error, "description": "No such job or method."},
    422: {"model": Error, "description": "Bad input; the message says what to fix."},
}
EVENT_STREAM = "text/event-stream"


def _info(record: JobRecord, progress: Event | None) -> JobInfo:
    return JobInfo(**client.masked(record), progress=progress)


def _method_info(m: Method) -> MethodInfo:
    info = describe_method(m)
    return MethodInfo(**{k: v for k, v in info.items() if k != "path"}, source=m.source)


bearer = HTTPBearer(auto_error=False)


def authorised(request: Request,
               credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """The bearer token must be one of the app's tokens (none configured: `--insecure`)."""
    tokens: list[str] = request.app.state.tokens
    if not tokens:
        return
    given = credentials.credentials if credentials else ""
    # As bytes: compare_digest refuses str with non-ASCII characters (a header can carry them).
    if not any(secrets.compare_digest(given.encode(), t.encode()) for t in tokens):
        raise HTTPException(401, "A valid `Authorization: Bearer <token>` header is required.",
                            headers={"WWW-Authenticate": "Bearer"})


async def deepe_error(request: Request, exc: Exception) -> JSONResponse:
    """A deepe error as an HTTP answer: the message says what to fix."""
    if isinstance(exc, JobNotFound) or (isinstance(exc, MethodNotFound) and request.method == "GET"):
        code = 404
    elif isinstance(exc, (InvalidJobState, JobExists)):
        code = 409
    elif isinstance(exc, BrokerUnavailable):
        code = 503
    else:
        code = 422  # bad input
    return JSONResponse({"detail": str(exc)}, status_code=code)


jobs_api = APIRouter(dependencies=[Depends(authorised)])  # jobs and methods: a token is needed
open_api = APIRouter()  # health and metrics: for probes and Prometheus


@jobs_api.post("/jobs", status_code=201, response_model=Submitted, responses={422: ERRORS[422]})
def submit(body: SubmitRequest) -> Submitted:
    """Validate and queue a job, exactly as `deepe submit` does."""
    job = client.submit(body.method, body.params, queue=body.queue, priority=body.priority,
                        time_limit=body.time_limit, check=body.check, gpus=body.gpus)
    return Submitted(id=job.id, status=job.status(), custom_params=job.custom_params)


@jobs_api.get("/jobs", response_model=JobList)
def jobs(status: JobStatus | None = None, method: str | None = None,
         limit: Annotated[int, Query(ge=1, le=500)] = 20,
         cursor: Annotated[str | None, Query(pattern=r"^\d+$")] = None) -> JobList:
    """Jobs, newest first."""
    records, next_cursor = client.list_jobs(status, method, limit, cursor)
    progress = client.progress_of(get_redis(), [r.id for r in records])  # one round trip for the page
    return JobList(jobs=[_info(r, progress[r.id]) for r in records], next_cursor=next_cursor)


@jobs_api.get("/jobs/{job_id}", response_model=JobInfo, responses={404: ERRORS[404]})
def job(job_id: str) -> JobInfo:
    """The job record, with secrets masked, its final metrics and its latest progress."""
    job = client.find_job(job_id)
    return _info(job.record(), job.progress())


EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Server-Sent Events (each `id` is the stream id), or a JSON list with follow=false.",
          "content": {EVENT_STREAM: {}, "application/json": {"schema": {
              "type": "array", "items": Event.model_json_schema(ref_template="#/components/schemas/{model}")}}}},
    404: ERRORS[404],
}


@jobs_api.get("/jobs/{job_id}/events", responses=EVENTS_RESPONSES, response_model=None)
def events(job_id: str, follow: bool = True, since: Annotated[str, Query(pattern=r"^\d+(-\d+)?$")] = "0",
           last_event_id: Annotated[str | None, Header(pattern=r"^\d+(-\d+)?$")] = None) -> Any:
    """Replay a job's events from `since` (or after `Last-Event-ID`), then tail them until it ends.

    A quiet job's stream carries a comment (`: keepalive`) every `SSE_KEEPALIVE` seconds without
    an event, so that a proxy does not close it as idle."""
    job = client.find_job(job_id)
    since = last_event_id or since
    stream = job.events(since=since, follow=follow)  # a bad `since` or an unknown job fails here, before the 200
    if not follow:
        return JSONResponse([e.model_dump(mode="json") for e in stream])
    return StreamingResponse(_sse(job.id, since), media_type=EVENT_STREAM, headers={"Cache-Control": "no-cache"})


SSE_KEEPALIVE = 15.0  # seconds without an event after which an SSE stream gets a comment (nginx cuts at 60)


def _sse(job_id: str, since: str) -> Iterator[str]:
    """A job's events as Server-Sent Events until it ends, with a keepalive comment when it is quiet."""
    from deepe_tasks.core.events import tail_events

    for event in tail_events(get_redis(), job_id, since=since, follow=True, idle=SSE_KEEPALIVE):
        if event is None:
            yield ": keepalive\n\n"
        else:
            yield f"id: {event.id}\nevent: {event.kind.value}\ndata: {json.dumps(event.model_dump(mode='json'))}\n\n"


@jobs_api.post("/jobs/{job_id}/cancel", response_model=JobRef,
               responses={404: ERRORS[404], 409: {"model": Error, "description": "The job already ended."}})
def cancel(job_id: str, save: bool = False) -> JobRef:
    """Cancel a queued job, or stop a running one at its next step (with `save`, publish it)."""
    job = client.find_job(job_id)
    return JobRef(id=job.id, status=job.cancel(save=save))


@jobs_api.post("/jobs/{job_id}/merge", status_code=201, response_model=JobRef,
               responses={404: ERRORS[404], 409: {"model": Error, "description": "The job did not succeed, or has "
                                                            "no adapter to merge."}})
def merge(job_id: str, queue: str | None = None) -> JobRef:
    """Queue a merge of a succeeded job's LoRA adapter into its base model; returns the merge job."""
    job = client.merge(client.find_job(job_id).id, queue=queue)
    return JobRef(id=job.id, status=job.status())


@jobs_api.get("/methods", response_model=list[MethodInfo])
def methods() -> list[MethodInfo]:
    return [_method_info(m) for m in list_methods(get_settings().method_root)]


@jobs_api.get("/methods/{name}", response_model=MethodInfo, responses={404: ERRORS[404]})
def method(name: str) -> MethodInfo:
    return _method_info(load_method(get_settings().method_root, name))


class QueueView(BaseModel):
    name: str
    gpus: int = Field(description="The devices each of its jobs trains on.")
    length: int
    waiting: list[dict[str, Any]] = Field(description="The jobs waiting, in the order they will start: id, priority.")
    running: list[str]
    workers: list[str] = Field(description="The workers consuming it (Celery's active_queues).")


class WorkerView(BaseModel):
    name: str
    devices: int
    seen: float = Field(description="When it last said it was up (epoch seconds).")
    queues: list[str] = Field(description="The queues it takes jobs of (of every size up to its devices).")


class Queues(BaseModel):
    queues: list[QueueView]
    workers: list[WorkerView]


@jobs_api.get("/queues", response_model=Queues)
def queues() -> Queues:
    """What `deepe queues` shows: each queue, its jobs and its workers; and the workers up now."""
    from dataclasses import asdict

    from deepe_tasks.core import devices
    from deepe_tasks.queue.queues import overview
    from deepe_tasks.worker.celery_app import app_for

    settings = get_settings()
    active = app_for(settings.redis_url).control.inspect(timeout=1.0).active_queues()
    infos = overview(get_redis(), active)
    up = devices.live(get_redis(), stale_after=devices.STALE_AFTER_TTLS * settings.lease_ttl)
    return Queues(queues=[QueueView(**asdict(i)) for i in infos],
                  workers=[WorkerView(name=w, devices=n, seen=seen, queues=q) for w, n, seen, q in up])


@open_api.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz() -> Any:
    """Whether Redis answers, and how many workers answered a ping."""
    from deepe_tasks.worker.celery_app import app_for

    try:
        get_redis().ping()
    except Exception:
        return JSONResponse(Health(redis=False, workers=0).model_dump(), status_code=503)
    replies = app_for(get_settings().redis_url).control.ping(timeout=0.5) or []
    return Health(redis=True, workers=len(replies))


@open_api.get("/metrics", response_class=PlainTextResponse)
def metrics() -> PlainTextResponse:
    """Prometheus metrics: jobs by state, queue lengths, running jobs, events, job durations."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    from deepe_tasks.ui.metrics import DeepeCollector

    registry = CollectorRegistry()
    registry.register(DeepeCollector())
    return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)


def create_app(tokens: list[str], insecure: bool = False) -> FastAPI:
    """The API app; without tokens it refuses to be built unless ``insecure``."""
    if not tokens and not insecure:
        raise DeepeError("No API token is configured: set DEEPE_API_TOKENS (comma-separated), "
                         "or start with --insecure on a trusted network only.")
    if insecure and not tokens:
        log.warning("the deepe API runs WITHOUT authentication (--insecure)")
    app = FastAPI(title="deepe", version="0.1.0", description=__doc__, responses={401: ERRORS[401]})
    app.state.tokens = list(tokens)
    app.add_exception_handler(DeepeError, deepe_error)
    app.include_router(jobs_api)
    app.include_router(open_api)
    # The job page: static files, no token needed to load them; every call they make needs one.
    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="ui")
    app.add_api_route("/", lambda: RedirectResponse("/ui/"), include_in_schema=False)
    return app


STATIC = Path(__file__).resolve().parent / "static"
