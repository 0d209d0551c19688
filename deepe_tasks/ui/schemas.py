"""The HTTP API's request and response bodies (`ui/api.py`), as its OpenAPI document shows them."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deepe_tasks.core.records import Event, JobRecord, JobStatus


class RequestBody(BaseModel):
    """A request body: a field it does not have is refused (422) by name, never dropped."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fields = list(cls.model_fields)
            unknown = [k for k in data if k not in fields]
            if unknown:
                said = []
                for key in unknown:
                    close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.7)
                    said.append(f"{str(key)[:64]!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
                raise ValueError(f"this body has no field {', '.join(said)}; its fields are {', '.join(fields)}. "
                                 "Fix or remove the field: unknown fields are refused, not ignored.")
        return data


class SubmitRequest(RequestBody):
    method: str = Field(description="A method name in the method store, such as sft-demo.")
    params: dict[str, Any] = Field(description="Parameters: MODEL_PATH, DATASET_PATH, ... and custom keys.")
    queue: str | None = Field(None, description="The queue; DEEPE_QUEUE when absent.")
    priority: int | None = Field(None, description="0 (highest) to 9.")
    time_limit: float | None = Field(None, description="Seconds an attempt may train.")
    check: bool = Field(True, description="Refuse a method that the static check rejects; false for code it misreads.")
    gpus: int = Field(1, strict=True, description=(
        "Devices the job trains on, one rank each (DDP); refused when no worker owns that many."))
    webhook: str | None = Field(None, description=(
        "A URL this job's state changes are posted to (Standard Webhooks), besides DEEPE_WEBHOOK_URLS."))


class JobRef(BaseModel):
    id: str
    status: JobStatus


class Submitted(JobRef):
    custom_params: list[str] = Field(default_factory=list, description=(
        "The keys that are no parameter of the platform or the method, passed on as they are."))
    notices: list[str] = Field(default_factory=list, description=(
        "What the submitter should know, e.g. that no worker consumes the job's queue now (it is queued anyway)."))


class ModelFile(BaseModel):
    name: str = Field(description="The file's path inside the model.")
    size: int = Field(description="Bytes.")


class PublishedModel(BaseModel):
    """What the job published at its output_dir: a model exists when and only when its deepe.json
    does (on an object store, its files are under the key deepe.json names)."""

    published: bool = Field(description="Whether deepe.json is there.")
    url: str | None = Field(None, description="The output_dir: a folder, or a URL on the object store.")
    files: list[ModelFile] = Field(default_factory=list, description="The model's files (deepe.json aside).")
    total_bytes: int = 0
    partial: bool = Field(False, description="Published by a cancel with save, before the last step.")
    note: str | None = Field(None, description="Why there is no model, when there is none.")


class JobInfo(JobRecord):
    """The job record (secrets masked) and its latest progress."""

    progress: Event | None = Field(None, description="The latest `log` event: step, max_steps, ETA, metrics.")
    model: PublishedModel | None = Field(None, description=(
        "Only in GET /jobs/{id}: the published model's files, looked for once the job ended with one "
        "(succeeded, or cancelled)."))


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


class EvalRequest(RequestBody):
    dataset: str | None = Field(None, description="A dataset with the prompt and answer columns (a path as "
                                                 "DATASET_PATH); this, lm_eval, or both.")
    lm_eval: str | None = Field(None, description="An lm-evaluation-harness task file (YAML) with its local data, "
                                                 "as `deepe eval --lm-eval` takes.")
    max_samples: int | None = Field(None, description="Evaluate at most this many rows.")
    samples: int = Field(5, description="How many prompts eval.json shows with both answers.")
    input_column: str | None = Field(None, description="The prompt column; default instruction.")
    output_column: str | None = Field(None, description="The answer column; default output.")
    queue: str | None = Field(None, description="The queue; default the job's own.")


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
