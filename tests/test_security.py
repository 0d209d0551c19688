"""What a method can reach: only its own job's keys, through a Redis user of its own attempt."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import cast

import pytest
import redis

from deepe_tasks import JobStatus, submit
from deepe_tasks.core.settings import get_settings
from deepe_tasks.fixtures.embedded import RedisServer
from tests.helpers import TRL_SNIPPET, Worker, write_method
from tests.test_jobstore import needs_redis_7

pytestmark = pytest.mark.e2e

# A method that looks for the worker's credential and tries the cluster's keys, and writes
# what it found into its job folder (its working directory).
PROBE = TRL_SNIPPET + '''
import json, os

_redis = callback.emit.__self__._redis
_kwargs = _redis.connection_pool.connection_kwargs
_own = "deepe:job:" + callback.job_id
_tries = {}
for _name, _try in {
    "write another job's record": lambda: _redis.hset("deepe:job:someone-else", "status", "succeeded"),
    "write its own record": lambda: _redis.hset(_own, "status", "succeeded"),
    "take its own lease": lambda: _redis.set("deepe:lease:" + callback.job_id, "mine"),
    "read the running set": lambda: _redis.smembers("deepe:running"),
    "push onto a queue": lambda: _redis.lpush("gpu", "x"),
    "list the users": lambda: _redis.acl_list(),
    "read another job's stream": lambda: _redis.xrange("deepe:events:someone-else"),
}.items():
    try:
        _try()
        _tries[_name] = "allowed"
    except Exception as e:
        _tries[_name] = type(e).__name__
with open("probe.json", "w") as _f:
    json.dump({"username": _kwargs.get("username"), "seen": repr(_kwargs) + json.dumps(dict(os.environ)),
               "tries": _tries}, _f)
'''


def test_a_method_gets_a_user_of_its_own_that_reaches_only_its_jobs_keys(
        tmp_path: Path, store: Path, storage: Path, sft_params: dict[str, object],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a Redis with a password, and a worker that knows it
    password = secrets.token_hex(16)
    server = RedisServer(folder=tmp_path / "redis", password=password).start()
    monkeypatch.setenv("DEEPE_REDIS_URL", server.url)
    get_settings.cache_clear()
    write_method(store, "probe", PROBE)
    w = Worker("probe-q", tmp_path / "worker.log", env={"DEEPE_REDIS_URL": server.url})
    try:
        admin = redis.Redis.from_url(server.url, decode_responses=True)
        needs_redis_7(admin)
        w.start()
        # When a method looks around
        job = submit("probe", {**sft_params, "MAX_STEPS": 2, "PromptInputColumn": "instruction",
                               "PromptOutputColumn": "output"}, queue="probe-q")
        assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
        probe = json.loads((storage / "jobs" / job.id / "probe.json").read_text())
        # Then it connected as its attempt's own user and never saw the worker's password
        assert probe["username"] == f"deepe-attempt-{job.id}-1"
        assert password not in probe["seen"]
        # and every key beyond its own stream and reads was refused
        assert probe["tries"] == dict.fromkeys(probe["tries"], "NoPermissionError")
        # and once the attempt ended, its user is gone
        assert not [u for u in cast(list[str], admin.acl_users()) if u.startswith("deepe-attempt-")]
        admin.close()
    finally:
        w.stop()
        server.stop()
        monkeypatch.undo()
        get_settings.cache_clear()
