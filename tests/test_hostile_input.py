"""Hostile input through every door (HTTP, the CLI, Python): a clear refusal, never a 5xx, a
traceback, a broken stream or a change to the type of one of the cluster's own keys.

`HTTP_CASES` and `CLI_CASES` are the bad-input table of docs/reliability.md
(`python -m tests.test_hostile_input` prints it).
"""

from __future__ import annotations

import json
import string
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from deepe_tasks import submit
from deepe_tasks.core.errors import InvalidParams
from tests.helpers import API_TOKEN, cli_here

BIG = "1" * 30  # beyond 64 bits
DEEP: dict[str, Any] = {}
_level = DEEP
for _ in range(300):
    _level["x"] = {}
    _level = _level["x"]


def base(sft_params: dict[str, Any], **change: Any) -> dict[str, Any]:
    return {"method": "sft-demo", "params": {**sft_params, **change}}


# label: (method, path, body or None, extra headers, status, words in the answer)
HTTP_CASES: dict[str, tuple[str, str, Any, dict[str, str], int, str]] = {
    "queue naming deepe's running set": ("POST", "/jobs", {"queue": "deepe:running"}, {}, 422, "queue 'deepe:running' is not valid"),
    "queue naming the job index": ("POST", "/jobs", {"queue": "deepe:jobs"}, {}, 422, "is not valid"),
    "queue naming kombu's unacked hash": ("POST", "/jobs", {"queue": "unacked"}, {}, 422, "is reserved"),
    "queue naming a kombu binding": ("POST", "/jobs", {"queue": "_kombu.binding.gpu"}, {}, 422, "is not valid"),
    "queue naming a Celery result": ("POST", "/jobs", {"queue": "celery-task-meta-x"}, {}, 422, "is reserved"),
    "queue with a space": ("POST", "/jobs", {"queue": "a b"}, {}, 422, "is not valid"),
    "queue of 300 characters": ("POST", "/jobs", {"queue": "q" * 300}, {}, 422, "is not valid"),
    "NUL in MODEL_PATH": ("POST", "/jobs", {"params": {"MODEL_PATH": "models/a\x00b"}}, {}, 422, "NUL"),
    "NUL in OUTPUT_DIR": ("POST", "/jobs", {"params": {"OUTPUT_DIR": "models/a\x00b"}}, {}, 422, "NUL"),
    "params nested 300 deep": ("POST", "/jobs", {"params": {"deep": DEEP}}, {}, 422, "nested more than 32"),
    "an infinite time limit": ("POST", "/jobs", {"time_limit": "1e309"}, {}, 422, "time_limit"),
    "a time limit over a year": ("POST", "/jobs", {"time_limit": 1e9}, {}, 422, "time_limit"),
    "a job of 10,000 devices": ("POST", "/jobs", {"gpus": 10_000}, {}, 422, "gpus=10000 is not valid"),
    "a job of zero devices": ("POST", "/jobs", {"gpus": 0}, {}, 422, "gpus=0 is not valid"),
    "a queue named like a multi-device queue": ("POST", "/jobs", {"queue": "gpu.4gpus"}, {}, 422, "gpus=N"),
    "OUTPUT_DIR naming a file": ("POST", "/jobs", {"params": {"OUTPUT_DIR": "data/colors.jsonl"}}, {}, 422, "is a file"),
    "a non-ASCII bearer token": ("GET", "/jobs", None, {"Authorization": "Bearer tökén"}, 401, "Bearer"),
    "an empty bearer token": ("GET", "/jobs", None, {"Authorization": "Bearer "}, 401, "Bearer"),
    "since beyond 64 bits": ("GET", "/jobs/{job}/events?since=" + BIG, None, {}, 422, ""),
    "since beyond 64 bits, as ms-seq": ("GET", "/jobs/{job}/events?since=1-" + BIG, None, {}, 422, ""),
    "Last-Event-ID beyond 64 bits": ("GET", "/jobs/{job}/events", None, {"Last-Event-ID": BIG}, 422, "not a stream id"),
    "cursor beyond 64 bits": ("GET", "/jobs?cursor=" + BIG, None, {}, 422, "cursor"),
    "an unknown job": ("GET", "/jobs/no-such-job", None, {}, 404, "There is no job"),
    "events of an unknown job": ("GET", "/jobs/no-such-job/events?follow=false", None, {}, 404, "There is no job"),
    "a method name with a path": ("GET", "/methods/..%2F..%2Fetc", None, {}, 404, ""),
    "cancel of an unknown job": ("POST", "/jobs/no-such-job/cancel", None, {}, 404, "There is no job"),
}

# label: (argv, exit code, words on stderr)
CLI_CASES: dict[str, tuple[list[str], int, str]] = {
    "submit to deepe's running set": (["submit", "sft-demo", "--queue", "deepe:running"], 2, "is not valid"),
    "submit to a reserved queue": (["submit", "sft-demo", "--queue", "unacked"], 2, "is reserved"),
    "submit with an infinite time limit": (["submit", "sft-demo", "--time-limit", "inf"], 2, "time_limit"),
    "submit with a NaN time limit": (["submit", "sft-demo", "--time-limit", "nan"], 2, "time_limit"),
    "submit with a job id ending in a newline": (["submit", "sft-demo", "--job-id", "nl-test\n"], 2, "job id"),
    "submit with a priority of 99": (["submit", "sft-demo", "--priority", "99"], 2, "priority=99"),
    "submit asking for -1 devices": (["submit", "sft-demo", "--gpus", "-1"], 2, "gpus=-1 is not valid"),
    "a worker owning the same device twice": (["worker", "--gpus", "0,0"], 2, "distinct device indexes"),
    "logs since a word": (["logs", "{job}", "--since", "abc"], 2, "not a stream id"),
    "logs since beyond 64 bits": (["logs", "{job}", "--since", BIG], 2, "not a stream id"),
    "status of a job id with a newline": (["status", "a\nb"], 2, "is not valid"),
    "cancel of a path": (["cancel", "../../etc"], 2, "is not valid"),
    "jobs with a limit beyond 64 bits": (["jobs", "--limit", BIG], 2, "limit"),
    "queues naming deepe's running set": (["queues", "--queue", "deepe:running"], 2, "is not valid"),
    "a worker on deepe's running set": (["worker", "--queues", "gpu,deepe:running"], 2, "is not valid"),
    "submit with a parameter that is not KEY=VALUE": (["submit", "sft-demo", "-p", "=x"], 2, "is not KEY=VALUE"),
    "run-local with a wrong value": (["run-local", "sft-demo", "-p", "MAX_STEPS=abc"], 2, "MAX_STEPS"),
    "a new method named with a path": (["methods", "new", "../../etc/x"], 2, "is not a method name"),
    "a check of a path": (["methods", "check", "../../etc/passwd"], 2, "is not a method name"),
}


@pytest.fixture(scope="module")
def a_job(sft_params: dict[str, Any]) -> str:
    # A job that stays queued: nobody consumes this queue.
    return submit("sft-demo", sft_params, queue="hostile-q").id


@pytest.fixture(scope="module")
def sft_params(tiny_model: Path, colors_data: Path) -> dict[str, Any]:
    return {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(colors_data), "MAX_STEPS": 2}


def key_types(r: redis.Redis) -> dict[str, str]:
    found: dict[str, Any] = {k: r.type(k) for k in r.scan_iter(count=1000)}
    return {k: t for k, t in found.items() if t != "none"}  # "none": it expired since the scan (a lease)


@pytest.fixture
def cluster_keys_unchanged(redis_url: str) -> Iterator[None]:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    before = key_types(r)
    yield
    after = key_types(r)
    assert {k: after[k] for k in before if k in after} == {k: t for k, t in before.items() if k in after}
    assert not {"a b", "unacked", "deepe:running:1"} & set(after) - set(before)
    r.close()


@pytest.mark.parametrize("label", list(HTTP_CASES))
def test_hostile_http_input_is_refused_clearly(label: str, http: TestClient, a_job: str, sft_params: dict[str, Any],
                                               cluster_keys_unchanged: None) -> None:
    method, path, body, headers, status, words = HTTP_CASES[label]
    payload = None
    if body is not None:
        merged = base(sft_params)
        merged.update({k: v for k, v in body.items() if k != "params"})
        merged["params"].update(body.get("params", {}))
        payload = json.dumps(merged).replace('"1e309"', "1e309")  # a number JSON can carry, Python reads as inf
    raw = {"Content-Type": b"application/json", **{k: v.encode() for k, v in headers.items()}}
    response = http.request(method, path.format(job=a_job), content=payload, headers=raw)  # type: ignore[arg-type]
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert words in response.text


@pytest.mark.parametrize("label", list(CLI_CASES))
def test_hostile_cli_input_is_refused_without_a_traceback(label: str, a_job: str, tiny_model: Path,
                                                          colors_data: Path, cluster_keys_unchanged: None) -> None:
    argv, code, words = CLI_CASES[label]
    argv = [a.format(job=a_job) for a in argv]
    if argv[0] in ("submit", "run-local"):
        argv += ["-p", f"MODEL_PATH={tiny_model}", "-p", f"DATASET_PATH={colors_data}"]
    done = cli_here(*argv)
    assert done.returncode == code, (done.returncode, done.stdout[-500:], done.stderr[-500:])
    assert "Traceback" not in done.stdout + done.stderr
    assert words in done.stderr


def test_a_job_id_ending_in_a_newline_is_refused_in_python(sft_params: dict[str, Any]) -> None:
    with pytest.raises(InvalidParams, match="job id 'nl-test\\\\n' is not valid"):
        submit("sft-demo", sft_params, job_id="nl-test\n")


HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
                      max_size=80)


@given(token=HEADER_TEXT, last_event_id=HEADER_TEXT)
@settings(max_examples=3 * cast(settings, settings.default).max_examples)
def test_any_authorization_and_last_event_id_header_gets_a_clear_answer(token: str, last_event_id: str,
                                                                        http: TestClient, a_job: str) -> None:
    headers = {"Authorization": f"Bearer {token}".encode(), "Last-Event-ID": last_event_id.encode()}
    response = http.get(f"/jobs/{a_job}/events?follow=false", headers=headers)  # type: ignore[arg-type]
    assert response.status_code in (200, 401, 422), (response.status_code, response.text[:300])
    ok_id = last_event_id == "" or all(c in string.digits + "-" for c in last_event_id)
    if response.status_code == 200:
        assert token == API_TOKEN and ok_id


def table() -> str:
    """The bad-input table of docs/reliability.md, from the cases above."""
    rows = ["| input | through | answer |", "|---|---|---|"]
    for label, (method, path, _, _, status, _) in HTTP_CASES.items():
        rows.append(f"| {label} | `{method} {path.split('?')[0].replace('{job}', '{id}')}` | HTTP {status} |")
    for label, (argv, code, _) in CLI_CASES.items():
        command = " ".join(argv[:2]) if argv[0] == "methods" else argv[0]
        rows.append(f"| {label} | `deepe {command}` | exit {code}, a sentence, no traceback |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
