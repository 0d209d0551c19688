"""Webhooks against a real local receiver that verifies signatures with `standardwebhooks`:
every state change arrives, signed, in order, each webhook-id once; refusals and retries; a
worker SIGKILLed before it delivered leaves the deliveries to another; hostile URLs refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deepe_tasks import InvalidParams, JobStatus, submit
from deepe_tasks.core import keys, webhooks
from deepe_tasks.core.settings import get_settings
from tests.helpers import TRL_SNIPPET, Worker, cli_here, wait_for, write_method
from tests.webhook_receiver import SECRET, Receiver

ON = {"DEEPE_WEBHOOK_SECRET": SECRET, "DEEPE_WEBHOOK_ALLOW_PRIVATE": "true", "DEEPE_LEASE_TTL": "3"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def hooked(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """This process (the submitter) and its workers with DEEPE_WEBHOOK_URLS set to the receiver."""
    env = {**ON, "DEEPE_WEBHOOK_URLS": receiver.url}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    yield env
    monkeypatch.undo()
    get_settings.cache_clear()
    _redis().delete(keys.WEBHOOKS_ON)  # the session's other tests run without webhooks


@pytest.fixture
def method(store: Path) -> str:
    return write_method(store, "hooked_sft", TRL_SNIPPET)


def params(sft: dict[str, Any]) -> dict[str, Any]:
    return {**sft, "MAX_STEPS": 2, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}


TYPES = ["job.queued", "job.started", "job.succeeded"]


@pytest.mark.e2e
def test_every_state_change_arrives_signed_in_order_once_despite_refusals_and_a_slow_receiver(
        workers: list[Worker], tmp_path: Path, receiver: Receiver, hooked: dict[str, str], method: str,
        sft_params: dict[str, Any]) -> None:
    workers.append(Worker("hooks-q", tmp_path / "w.log", env=hooked).start())
    # Given a receiver that refuses the first two deliveries (500) and answers slowly
    receiver.fail_next, receiver.slow = 2, 0.5
    job = submit(method, params(sft_params), queue="hooks-q")
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED
    wait_for(lambda: len(receiver.taken(job.id)) == 3, timeout=90)
    taken = receiver.taken(job.id)
    # Then each state change was taken once, in order, with the job's record (secrets masked)
    assert [d["type"] for d in taken] == TYPES, receiver.dump()
    assert len({d["id"] for d in taken}) == 3 and taken[-1]["data"]["status"] == "succeeded"
    # and the refused ones came again with the same webhook-id; no signature failed
    refused = [d for d in receiver.deliveries if d["refused"]]
    assert len(refused) == 2 and {d["id"] for d in refused} <= {d["id"] for d in taken}
    assert receiver.rejected == 0
    wait_for(lambda: not webhooks.pending(_redis()), timeout=10)


@pytest.mark.e2e
def test_deliveries_of_a_worker_killed_before_it_sent_them_are_sent_by_another(
        workers: list[Worker], tmp_path: Path, receiver: Receiver, hooked: dict[str, str], method: str,
        sft_params: dict[str, Any]) -> None:
    # Given a receiver that is down while a job runs and succeeds on the first worker
    port_url = receiver.url
    receiver.stop()
    first = Worker("hooks-kill", tmp_path / "w1.log", env=hooked).start()
    workers.append(first)
    job = submit(method, params(sft_params), queue="hooks-kill")
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED
    assert [p["type"] for p in webhooks.pending(_redis()) if p["job"] == job.id] == TYPES
    # When that worker is SIGKILLed with its deliveries unsent, and the receiver comes back
    first.process.signal(signal.SIGKILL, group=True)
    again = Receiver(port=int(port_url.rsplit(":", 1)[1].split("/")[0])).start()
    try:
        workers.append(Worker("hooks-kill", tmp_path / "w2.log", env=hooked).start())
        # Then another worker's dispatcher delivers them, in order
        wait_for(lambda: len(again.taken(job.id)) == 3, timeout=90)
        assert [d["type"] for d in again.taken(job.id)] == TYPES
        assert again.rejected == 0
    finally:
        again.stop()


@pytest.mark.e2e
def test_deliveries_in_the_outbox_survive_a_redis_crash_and_restart_from_its_aof(
        workers: list[Worker], tmp_path: Path, receiver: Receiver, hooked: dict[str, str], method: str,
        sft_params: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from deepe_tasks.fixtures.embedded import RedisServer

    server = RedisServer(appendonly=True, folder=tmp_path / "redis").start()
    monkeypatch.setenv("DEEPE_REDIS_URL", server.url)
    get_settings.cache_clear()
    try:
        # Given a job queued with webhooks on and no worker up yet: its job.queued waits in the outbox
        job = submit(method, params(sft_params), queue="hooks-aof")
        assert [(p["job"], p["type"]) for p in webhooks.pending(_redis())] == [(job.id, "job.queued")]
        # When Redis crashes (SIGKILL, once its AOF had its once-a-second fsync) and starts again from the AOF
        time.sleep(1.5)
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        server.start()
        # Then the delivery is still waiting, and a worker started now delivers every state change, in order
        assert [(p["job"], p["type"]) for p in webhooks.pending(_redis())] == [(job.id, "job.queued")]
        workers.append(Worker("hooks-aof", tmp_path / "w.log", env={**hooked, "DEEPE_REDIS_URL": server.url}).start())
        assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
        wait_for(lambda: len(receiver.taken(job.id)) == 3, timeout=90)
        assert [d["type"] for d in receiver.taken(job.id)] == TYPES, receiver.dump()
        assert receiver.rejected == 0
    finally:
        for w in workers:
            w.stop()
        server.stop()


class Api:
    """A real `deepe api` process (uvicorn) on a free port, with the settings of ON."""

    TOKEN = "t0ken-for-webhooks"

    def __init__(self, log: Path) -> None:
        from deepe_tasks.fixtures.embedded import free_port

        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, **ON, "DEEPE_API_TOKENS": self.TOKEN}
        self.proc = subprocess.Popen([sys.executable, "-m", "deepe_tasks", "api", "--port", self.url.rsplit(":", 1)[1]],
                                     env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.TOKEN}"}, timeout=30)
        wait_for(self._ready, timeout=60)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "the API exited"
        try:
            return self.http.get("/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=20)
        self.http.close()


@pytest.mark.e2e
def test_a_per_job_webhook_submitted_over_http_is_delivered_though_the_api_was_killed_right_after_the_201(
        workers: list[Worker], tmp_path: Path, receiver: Receiver, method: str, sft_params: dict[str, Any]) -> None:
    # Given a job submitted over HTTP with a webhook of its own, to a queue no worker takes yet
    first = Api(tmp_path / "api1.log")
    created = first.http.post("/jobs", json={"method": method, "params": params(sft_params), "queue": "hooks-api",
                                             "webhook": receiver.url})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    # When the API is SIGKILLed right after its 201
    first.kill()
    # Then its delivery waits in Redis's outbox (the API sends none), and a new API serves the job
    assert [p["type"] for p in webhooks.pending(_redis(), count=webhooks.ROUND_ENTRIES) if p["job"] == job_id] == [
        "job.queued"]
    second = Api(tmp_path / "api2.log")
    try:
        workers.append(Worker("hooks-api", tmp_path / "w.log", env=ON).start())
        wait_for(lambda: second.http.get(f"/jobs/{job_id}").json()["status"] == "succeeded", timeout=180)
        # and the worker delivers every state change to the job's URL, signed, in order, each webhook-id once
        wait_for(lambda: len(receiver.taken(job_id)) == 3, timeout=90)
        taken = receiver.taken(job_id)
        assert [d["type"] for d in taken] == TYPES, receiver.dump()
        assert len({d["id"] for d in taken}) == 3 and receiver.rejected == 0
        assert [d for d in receiver.deliveries if d["data"].get("id") == job_id] == taken  # none twice, none refused
        assert taken[-1]["data"]["webhook"] == receiver.url
    finally:
        second.kill()


def test_hostile_webhook_urls_are_refused_at_submit(sft_params: dict[str, Any], method: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPE_WEBHOOK_ALLOW_PRIVATE", raising=False)
    get_settings.cache_clear()
    for url, why in (("http://127.0.0.1:9/x", "private, loopback or link-local"),
                     ("http://localhost/x", "private, loopback or link-local"),
                     ("http://169.254.169.254/latest/meta-data", "private, loopback or link-local"),
                     ("http://10.1.2.3/x", "private, loopback or link-local"),
                     ("file:///etc/passwd", "not an http or https URL"),
                     ("gopher://example.com/", "not an http or https URL"),
                     ("https://example.com/" + "a" * 10_000, "longer than 2048")):
        with pytest.raises(InvalidParams, match=why):
            submit(method, params(sft_params), webhook=url)
    done = cli_here("submit", method, "-p", f"MODEL_PATH={sft_params['MODEL_PATH']}",
                    "-p", f"DATASET_PATH={sft_params['DATASET_PATH']}", "--webhook", "http://[::1]:8080/")
    assert done.returncode == 2 and "private, loopback or link-local" in done.stderr


def test_a_redirect_is_not_followed(receiver: Receiver) -> None:
    # Given a receiver that answers 301 to an internal address
    inner = Receiver().start()
    try:
        receiver.redirect_to = inner.url
        settings = get_settings().model_copy(update={"webhook_allow_private": True,
                                                     "webhook_secret": _secret()})
        # When a delivery is posted to it, the redirect is reported, not followed
        error = webhooks.post(receiver.url, "msg_1", b'{"type": "job.queued", "data": {}}', settings)
        assert error is not None and "HTTP 301" in error and "not followed" in error
        assert inner.deliveries == [] and inner.rejected == 0
    finally:
        inner.stop()


def _secret() -> Any:
    from pydantic import SecretStr

    return SecretStr(SECRET)


def _redis() -> Any:
    from deepe_tasks.core.connection import get_redis

    return get_redis()
