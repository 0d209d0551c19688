"""The HTTP API (`deepe api`): the Python client over HTTP, for backends in any language.

It has no logic of its own: every route calls the same client code as `deepe_tasks.submit`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from deepe_tasks.contract.methods import Method, describe_method, list_methods, load_method
from deepe_tasks.core import devices, validate
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.errors import (
    DeepeError,
)
from deepe_tasks.core.events import progress_of
from deepe_tasks.core.records import Event, JobRecord, JobStatus
from deepe_tasks.core.settings import get_settings
from deepe_tasks.queue import client
from deepe_tasks.ui import answers, health, limits, sse
from deepe_tasks.ui.schemas import (
    Error,
    EvalRequest,
    Health,
    JobInfo,
    JobList,
    JobRef,
    MethodInfo,
    PublishedModel,
    Queues,
    QueueView,
    SubmitRequest,
    Submitted,
    WorkerView,
)

log = logging.getLogger(__name__)


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "No token, or a wrong one (before any body is read)."},
    404: {"model": Error, "description": "No such job or method."},
    413: {"model": Error, "description": "A body over DEEPE_API_MAX_BODY_BYTES (before it is read)."},
    422: {"model": Error, "description": "Bad input; the message says what to fix."},
    503: {"model": Error, "description": "Redis does not answer; try again."},
}
EVENT_STREAM = sse.EVENT_STREAM


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
    if tokens and not limits.valid_token(tokens, credentials.credentials if credentials else ""):
        raise HTTPException(401, limits.TOKEN_REQUIRED, headers={"WWW-Authenticate": "Bearer"})


jobs_api = APIRouter(dependencies=[Depends(authorised)])  # jobs and methods: a token is needed
open_api = APIRouter()  # health and metrics: for probes and Prometheus


@jobs_api.post("/jobs", status_code=201, response_model=Submitted, responses={422: ERRORS[422]})
def submit(body: SubmitRequest) -> Submitted:
    """Validate and queue a job, exactly as `deepe submit` does."""
    job = client.submit(body.method, body.params, queue=body.queue, priority=body.priority,
                        time_limit=body.time_limit, check=body.check, gpus=body.gpus, webhook=body.webhook)
    return Submitted(id=job.id, status=job.status(), custom_params=job.custom_params, notices=job.notices)


@jobs_api.get("/jobs", response_model=JobList)
def jobs(status: JobStatus | None = None, method: str | None = None,
         limit: Annotated[int, Query(ge=1, le=500)] = 20,
         cursor: Annotated[str | None, Query(pattern=r"^\d+$")] = None) -> JobList:
    """Jobs, newest first."""
    records, next_cursor = client.list_jobs(status, method, limit, cursor)
    progress = progress_of(get_redis(), [r.id for r in records])  # one round trip for the page
    return JobList(jobs=[_info(r, progress[r.id]) for r in records], next_cursor=next_cursor)


@jobs_api.get("/jobs/{job_id}", response_model=JobInfo, responses={404: ERRORS[404]})
def job(job_id: str) -> JobInfo:
    """The job record, with secrets masked, its final metrics and its latest progress; once it
    ended with a model, that model's files (one read and one listing of the storage)."""
    from deepe_tasks.ui.display import model_of

    job = client.find_job(job_id)
    record = job.record()
    return _info(record, job.progress()).model_copy(
        update={"model": PublishedModel(**model_of(record, get_settings().storage_url))})


EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Server-Sent Events (each `id` is the stream id), or a JSON list with follow=false.",
          "content": {EVENT_STREAM: {}, "application/json": {"schema": {
              "type": "array", "items": Event.model_json_schema(ref_template="#/components/schemas/{model}")}}}},
    404: ERRORS[404],
}


@jobs_api.get("/jobs/{job_id}/events", responses=EVENTS_RESPONSES, response_model=None)
def events(request: Request, job_id: str, follow: bool = True,
           since: Annotated[str, Query(pattern=r"^\d+(-\d+)?$")] = "0",
           last_event_id: Annotated[str | None, Header()] = None) -> Any:
    """Replay a job's events from `since` (or after `Last-Event-ID`), then tail them until it ends.

    A quiet job's stream carries a comment (`: keepalive`) every `SSE_KEEPALIVE` seconds without
    an event, so that a proxy does not close it as idle. It ends with the job's final event, or
    once the job has ended or its record expired. A token may hold DEEPE_API_MAX_STREAMS_PER_TOKEN
    streams open at once (429 past that)."""
    job = client.find_job(job_id)
    # Checked before the 200: a stream must not break after it.
    since = validate.stream_id(since) if last_event_id is None else validate.stream_id(last_event_id, "Last-Event-ID")
    job.status()  # a clear 404 for an unknown job
    if not follow:
        return JSONResponse([e.model_dump(mode="json") for e in sse.replay(get_redis(), job.id, since)])
    tokens: list[str] = request.app.state.tokens
    who = limits.bearer(request.headers.get("authorization")) if tokens else (request.client or ("", 0))[0]
    give_back = request.app.state.streams.take(who)
    return sse.EventStream(get_settings().redis_url, job.id, since, idle=SSE_KEEPALIVE, give_back=give_back)


SSE_KEEPALIVE = 15.0  # seconds without an event after which an SSE stream gets a comment (nginx cuts at 60)


@jobs_api.post("/jobs/{job_id}/cancel", response_model=JobRef,
               responses={404: ERRORS[404], 409: {"model": Error, "description": "The job already ended."}})
def cancel(job_id: str, save: bool = False) -> JobRef:
    """Cancel a queued job, or stop a running one at its next step (with `save`, publish it)."""
    job = client.find_job(job_id)
    return JobRef(id=job.id, status=job.cancel(save=save))


@jobs_api.post("/jobs/{job_id}/merge", status_code=201, response_model=JobRef,
               responses={404: ERRORS[404], 409: {"model": Error, "description": "The job did not succeed, or has "
                                                            "no adapter to merge, or was merged already (force=true replaces that model)."}})
def merge(job_id: str, queue: str | None = None, force: bool = False) -> JobRef:
    """Queue a merge of a succeeded job's LoRA adapter into its base model; returns the merge job."""
    job = client.merge(client.find_job(job_id).id, queue=queue, force=force)
    return JobRef(id=job.id, status=job.status())


@jobs_api.post("/jobs/{job_id}/eval", status_code=201, response_model=JobRef,
               responses={404: ERRORS[404], 409: {"model": Error, "description": "The job has no published model."}})
def evaluate(job_id: str, body: EvalRequest) -> JobRef:
    """Queue an evaluation of a succeeded job's model on a dataset, an lm-eval task file, or both."""
    from deepe_tasks.queue.evals import evaluate as queue_eval

    target = client.find_job(job_id)
    target.record()  # an unknown job is a 404 here, not a model path
    job = queue_eval(target.id, body.dataset, max_samples=body.max_samples, samples=body.samples,
                     input_column=body.input_column, output_column=body.output_column, queue=body.queue,
                     lm_eval=body.lm_eval)
    return JobRef(id=job.id, status=job.status())


@jobs_api.get("/compare", responses={404: ERRORS[404]})
def compare(jobs: Annotated[str, Query(description="Two job ids or more, comma-separated.")],
            curves: bool = False) -> dict[str, Any]:
    """Jobs side by side: differing parameters, final train and eval loss, evaluations by dataset
    (with `curves`, each job's train and eval loss by step, for a chart)."""
    from deepe_tasks.queue.compare import compare as compare_jobs

    return compare_jobs([j.strip() for j in jobs.split(",") if j.strip()], curves=curves)


@jobs_api.get("/methods", response_model=list[MethodInfo])
def methods() -> list[MethodInfo]:
    return [_method_info(m) for m in list_methods(get_settings().method_root)]


@jobs_api.get("/methods/{name}", response_model=MethodInfo, responses={404: ERRORS[404]})
def method(name: str) -> MethodInfo:
    return _method_info(load_method(get_settings().method_root, name))


@jobs_api.get("/queues", response_model=Queues)
def queues() -> Queues:
    """What `deepe queues` shows: each queue, its jobs and its workers; and the workers up now."""
    from dataclasses import asdict

    from deepe_tasks.core.broker import active_queues
    from deepe_tasks.queue.queues import overview

    settings = get_settings()
    active = active_queues()
    infos = overview(get_redis(), active)
    up = devices.live(get_redis(), stale_after=devices.STALE_AFTER_TTLS * settings.lease_ttl)
    return Queues(queues=[QueueView(**asdict(i)) for i in infos],
                  workers=[WorkerView(name=w, devices=n, seen=seen, queues=q) for w, n, seen, q in up])


@open_api.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz() -> Any:
    """Whether Redis answers (503 when it does not, within about 2 s), and how many workers said
    they were up within the last three lease TTLs."""
    settings = get_settings()
    up, workers = health.check(settings.redis_url, stale_after=devices.STALE_AFTER_TTLS * settings.lease_ttl)
    if not up:
        return JSONResponse(Health(redis=False, workers=0).model_dump(), status_code=503)
    return Health(redis=True, workers=workers)


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
    app = FastAPI(title="deepe", version="0.1.0", description=__doc__,
                  responses={code: ERRORS[code] for code in (401, 413, 503)})
    settings = get_settings()
    app.state.tokens = list(tokens)
    app.state.streams = limits.StreamSlots(settings.api_max_streams_per_token)
    answers.install(app)
    # Outermost: a body is refused (wrong token, too large) before any route reads it.
    app.add_middleware(limits.BodyGate, tokens=app.state.tokens, max_bytes=settings.api_max_body_bytes)
    app.include_router(jobs_api)
    app.include_router(open_api)
    # The job page: static files, no token needed to load them; every call they make needs one.
    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="ui")
    app.add_api_route("/", lambda: RedirectResponse("/ui/"), include_in_schema=False)
    return app


STATIC = Path(__file__).resolve().parent / "static"
