"""Odd but valid values followed all the way: submit, Redis, a real worker's job process, the
method, its events, and back out through every read route; and a value that once poisoned the
cluster is refused before any worker sees it (issue 23, defect 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from deepe_tasks import JobStatus, submit
from deepe_tasks.core import keys
from deepe_tasks.core.errors import InvalidParams
from tests.helpers import TRL_SNIPPET, Worker, cli_here, write_method

pytestmark = pytest.mark.e2e

QUEUE = "echo-q"  # its worker starts only once the job's record is in place

# A real TRL run on the tiny model whose every log line also carries each custom parameter.
ECHO = TRL_SNIPPET.replace("callbacks=[callback],", "callbacks=[Echo(), callback],").replace(
    "from trl import SFTConfig, SFTTrainer",
    '''from trl import SFTConfig, SFTTrainer
import json
from transformers import TrainerCallback


class Echo(TrainerCallback):
    """Every custom parameter, back out as a metric of each log line (strings as they are)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs.update({"echo:" + k: v if isinstance(v, str) else json.dumps(v) for k, v in params.custom.items()})
''')

# Accepted at submit: any UTF-8 text, however odd, and any JSON value within the bounds.
ODD: dict[str, Any] = {
    "日本語": "日本語のテキスト",
    "emoji_🚀": "🚀✨ a \"quote\", a 'single' one, <b>tags</b> & [red]markup[/]",
    "rtl_עברית": "שלום\u200f",
    "zero_width": "a\u200bb\ufeffc",
    "multi_line": "line 1\nline 2\ttabbed",
    "long_value": "ab" * 50_000,
    "nested": {"list": [1, 2.5, None, True], "ünï": "cödé"},
    "int64": 2**63 - 1,
}


@pytest.fixture
def params(tiny_model: Path, colors_data: Path) -> dict[str, Any]:
    return {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(colors_data), "MAX_STEPS": 2, "BATCH_SIZE": 4,
            "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}


def test_a_value_that_once_poisoned_the_cluster_is_refused_before_any_worker_sees_it(
        params: dict[str, Any], http: TestClient, r: redis.Redis) -> None:
    # Given the values of issue 23: a lone surrogate in JSON, a Latin-1 byte from argv
    jobs, waiting = r.zcard(keys.JOBS_INDEX), r.llen("gpu")
    # When they are submitted to the queue the session's workers take
    body = json.dumps({"method": "sft-demo", "params": {**params, "note": "\udc80"}})
    answer = http.post("/jobs", content=body, headers={"Content-Type": "application/json"})
    # Then both are refused, and no record and no message exists for a worker to take
    assert answer.status_code == 422 and "params['note'] is not valid UTF-8 text" in answer.json()["detail"]
    with pytest.raises(InvalidParams, match="the byte 0xE9, which is not UTF-8"):
        submit("sft-demo", {**params, "note": "caf\udce9"})
    assert (r.zcard(keys.JOBS_INDEX), r.llen("gpu")) == (jobs, waiting)


def test_odd_values_reach_the_method_and_come_back_through_every_route(
        params: dict[str, Any], store: Path, http: TestClient, r: redis.Redis, workers: list[Worker],
        tmp_path: Path) -> None:
    # Given a job with odd but valid values, queued while no worker takes its queue, whose record
    # also holds a lone surrogate, as a deepe from before submit refused them could write it
    write_method(store, "echo01", ECHO)
    job = submit("echo01", {**params, **ODD}, queue=QUEUE)
    stored = json.loads(r.hget(keys.job(job.id), "params") or "{}")
    r.hset(keys.job(job.id), "params", json.dumps({**stored, "legacy": "caf\udce9"}))
    # When a real worker runs it
    workers.append(Worker(QUEUE, tmp_path / "worker.log").start())
    status = job.wait(timeout=300)
    # Then it trains and succeeds: the worker read the legacy value as U+FFFD, not a hang
    assert status is JobStatus.SUCCEEDED, (job.record().error, workers[0].log()[-3000:])
    echoed = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in {**ODD, "legacy": "caf\ufffd"}.items()}
    # And each value is back, unchanged, in the record the API gives, its metrics and its events
    record = http.get(f"/jobs/{job.id}")
    assert record.status_code == 200
    assert {k: record.json()["params"][k] for k in ODD} == ODD and record.json()["params"]["legacy"] == "caf\ufffd"
    assert {k: record.json()["metrics"]["echo:" + k] for k in echoed} == echoed
    events = http.get(f"/jobs/{job.id}/events?follow=false")
    assert events.status_code == 200
    logged = [e["metrics"] for e in events.json() if e["kind"] == "log" and "loss" in e["metrics"]]
    assert logged and all({k: m["echo:" + k] for k in echoed} == echoed for m in logged)
    listed = http.get("/jobs?limit=100")
    assert listed.status_code == 200 and job.id in [j["id"] for j in listed.json()["jobs"]]
    # And the command line shows it without a traceback
    for argv in (["status", job.id], ["logs", job.id], ["jobs"]):
        done = cli_here(*argv)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (argv, done.stderr[-500:])
