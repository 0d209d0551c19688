"""The HTTP API through HTTP alone: a real uvicorn, the session's Redis and worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deepe_tasks.core.connection import get_redis
from deepe_tasks.fixtures.embedded import free_port
from tests.helpers import SLOW_METHOD, Worker, wait_for, write_method

# A real uvicorn in its own process, with the session's worker behind it.
pytestmark = pytest.mark.e2e

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Api:
    def __init__(self, log: Path, *args: str, tokens: str = TOKEN) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DEEPE_API_TOKENS": tokens}
        self.proc = subprocess.Popen([sys.executable, "-m", "deepe_tasks", "api", "--port", str(self.port), *args],
                                     env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    server = Api(tmp_path_factory.mktemp("api") / "api.log")
    wait_for(server.ready, timeout=60)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        yield http
    server.stop()


def sse(response: httpx.Response, stop_after: int | None = None) -> list[dict[str, Any]]:
    """Parse a Server-Sent Events body into [{id, event, data}], optionally stopping early."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line:
            if current:
                events.append(current)
                current = {}
                if stop_after is not None and len(events) >= stop_after:
                    break
            continue
        if line.startswith(":"):  # a comment: the keepalive of a quiet stream
            continue
        field, _, value = line.partition(": ")
        current[field] = json.loads(value) if field == "data" else value
    return events


@pytest.mark.e2e
def test_submit_follow_to_the_end_and_read_the_job(api: httpx.Client, worker: Worker,
                                                   sft_params: dict[str, Any]) -> None:
    created = api.post("/jobs", json={"method": "sft-demo", "params": {**sft_params, "HF_TOKEN": "hf_x"}})
    # the status is read after the send: a worker may have claimed the job already
    assert created.status_code == 201 and created.json()["status"] in ("queued", "running")
    job_id = created.json()["id"]
    with api.stream("GET", f"/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded" and "training" in kinds
    assert all(e["id"] == e["data"]["id"] for e in events)
    info = api.get(f"/jobs/{job_id}").json()
    assert info["status"] == "succeeded" and info["params"]["HF_TOKEN"] == "***"
    assert info["progress"]["step"] == 4 and "loss" in info["metrics"]
    history = api.get(f"/jobs/{job_id}/events", params={"follow": "false"}).json()
    assert [e["id"] for e in history] == [e["id"] for e in events]
    listed = api.get("/jobs", params={"method": "sft-demo", "status": "succeeded", "limit": 1}).json()
    assert listed["jobs"][0]["id"] == job_id


def test_jobs_are_listed_newest_first_in_pages(api: httpx.Client, sft_params: dict[str, Any]) -> None:
    ids = [api.post("/jobs", json={"method": "sft-demo", "params": sft_params, "queue": "page-q"}).json()["id"]
           for _ in range(3)]
    first = api.get("/jobs", params={"status": "queued", "limit": 2}).json()
    second = api.get("/jobs", params={"status": "queued", "limit": 2, "cursor": first["next_cursor"]}).json()
    seen = [j["id"] for j in first["jobs"] + second["jobs"]]
    assert seen[:3] == ids[::-1]
    for job_id in ids:
        api.post(f"/jobs/{job_id}/cancel")


@pytest.mark.e2e
def test_a_dropped_sse_connection_resumes_with_last_event_id(api: httpx.Client, worker: Worker, store: Path,
                                                            sft_params: dict[str, Any]) -> None:
    write_method(store, "slow", SLOW_METHOD)
    params = {**sft_params, "MAX_STEPS": 10, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}
    job_id = api.post("/jobs", json={"method": "slow", "params": params}).json()["id"]
    with api.stream("GET", f"/jobs/{job_id}/events") as response:
        first = sse(response, stop_after=4)  # then the connection drops
    with api.stream("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": first[-1]["id"]}) as response:
        rest = sse(response)
    entries: Any = get_redis().xrange(f"deepe:events:{job_id}")
    stream = [entry_id for entry_id, _ in entries]
    assert [e["id"] for e in first + rest] == stream
    assert rest[-1]["event"] == "succeeded"


@pytest.mark.e2e
def test_cancel_over_http(api: httpx.Client, sft_params: dict[str, Any]) -> None:
    job_id = api.post("/jobs", json={"method": "sft-demo", "params": sft_params, "queue": "nobody-q"}).json()["id"]
    assert api.post(f"/jobs/{job_id}/cancel").json() == {"id": job_id, "status": "cancelled"}
    again = api.post(f"/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]


def test_bad_requests_get_422_with_the_clis_messages(api: httpx.Client, sft_params: dict[str, Any]) -> None:
    bad = api.post("/jobs", json={"method": "sft-demo", "params": {**sft_params, "MAX_STEPS": "ten"}})
    assert bad.status_code == 422 and "MAX_STEPS='ten' is not valid" in bad.json()["detail"]
    unknown = api.post("/jobs", json={"method": "../x", "params": sft_params})
    assert unknown.status_code == 422 and "not a method name" in unknown.json()["detail"]
    assert api.get("/jobs/nope").status_code == 404
    assert api.get("/methods/sft-demo").json()["description"].startswith("SFT-Demo:")


def test_unknown_body_fields_are_refused_by_name_not_dropped(api: httpx.Client, sft_params: dict[str, Any]) -> None:
    # Given a body with a misspelt field, and one with a field the route has not
    typo = api.post("/jobs", json={"method": "sft-demo", "params": sft_params, "priorty": 0, "queue": "nobody-q"})
    extra = api.post("/jobs", json={"method": "sft-demo", "params": sft_params, "job_id": "mine", "queue": "nobody-q"})
    # Then both are refused, naming the field (and what was meant, where one is close)
    assert typo.status_code == 422, typo.text
    said = typo.json()["detail"][0]["msg"]
    assert "'priorty'" in said and "did you mean 'priority'?" in said, said
    assert extra.status_code == 422 and "'job_id'" in extra.json()["detail"][0]["msg"]
    assert "did you mean" not in extra.json()["detail"][0]["msg"]
    # And the evaluation route refuses its own unknown fields the same way
    bad_eval = api.post("/jobs/whatever/eval", json={"dataset": "d.jsonl", "max_sample": 3})
    assert bad_eval.status_code == 422 and "did you mean 'max_samples'?" in bad_eval.json()["detail"][0]["msg"]


def test_every_protected_route_needs_the_token(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    checked = 0
    for path, operations in spec["paths"].items():
        if path in ("/healthz", "/metrics"):
            continue
        for verb in operations:
            url = path.replace("{job_id}", "x").replace("{name}", "sft-demo")
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response = httpx.request(verb.upper(), f"{api.base_url}{url}", headers=headers, timeout=10)
                assert response.status_code == 401, (verb, path, headers)
                checked += 1
    assert checked >= 14
    assert httpx.get(f"{api.base_url}/healthz").status_code == 200


def test_the_openapi_document_has_request_response_and_error_schemas(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"SubmitRequest", "JobRef", "JobInfo", "JobList", "MethodInfo", "Health", "Error", "Event"} <= set(schemas)
    post = spec["paths"]["/jobs"]["post"]
    assert {"201", "401", "422"} <= set(post["responses"])


def test_metrics_parse_and_count_the_jobs(api: httpx.Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{api.base_url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    jobs = sum(s.value for s in families["deepe_jobs"].samples)
    assert jobs == get_redis().zcard("deepe:jobs")
    assert {"deepe_running_jobs", "deepe_queue_length", "deepe_events_published", "deepe_job_duration_seconds"} <= set(families)


def test_the_api_refuses_to_start_without_tokens_unless_insecure(tmp_path: Path) -> None:
    refused = subprocess.run([sys.executable, "-m", "deepe_tasks", "api", "--port", str(free_port())],
                             env={**os.environ, "DEEPE_API_TOKENS": ""}, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "No API token is configured" in refused.stderr
    insecure = Api(tmp_path / "api.log", "--insecure", tokens="")
    try:
        wait_for(insecure.ready, timeout=60)
        assert httpx.get(f"{insecure.url}/methods").status_code == 200
        assert "WITHOUT authentication" in (tmp_path / "api.log").read_text()
    finally:
        insecure.stop()
