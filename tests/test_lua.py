"""The Lua of the job state machine (`deepe_tasks/core/lua/*.lua`): every file is loaded, every
script compiles on a real Redis, and scripts that Redis forgot (a restart) are loaded again by
the worker's side, never by a job process."""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest
import redis

from deepe_tasks.core import jobstore, keys, lua, scripts
from deepe_tasks.core.records import Event, EventKind, JobRecord
from deepe_tasks.worker import credentials


def running_job(r: redis.Redis) -> str:
    """A job at its first attempt, on a queue no worker consumes."""
    job_id = f"lua-{uuid.uuid4().hex[:10]}"
    record = JobRecord(id=job_id, method="m", method_sha256="sha-" + job_id, params={}, output_dir="/o",
                       queue="lua-q")
    jobstore.create(r, record, "SOURCE", Event(kind=EventKind.QUEUED, job=job_id))
    claim = jobstore.claim(r, job_id, "w1", 60_000, Event(kind=EventKind.STARTED, job=job_id), worker="w1",
                           started_at=time.time(), pid=1)
    assert claim.outcome is jobstore.ClaimOutcome.OK
    return job_id


def test_every_lua_file_is_part_of_a_script_and_every_script_compiles(r: redis.Redis) -> None:
    # Every .lua file of the package is used, and every part a script names is a file
    assert lua.lua_files() == {p for parts in lua.PARTS.values() for p in parts}
    assert set(lua.SOURCES) == set(lua.PARTS) == set(scripts.SCRIPTS)
    # SCRIPT LOAD compiles a script: a syntax error fails it
    with pytest.raises(redis.ResponseError, match="(?i)error compiling script"):
        r.script_load("return (")
    for name, source in lua.SOURCES.items():
        assert source.isascii() and "${" not in source, name
        sha = r.script_load(source)
        # the hash that a job process runs (EVALSHA) is the one its worker loaded
        assert sha == scripts.SCRIPTS[name].sha == hashlib.sha1(source.encode()).hexdigest(), name
    assert set(scripts.JOB_SCRIPTS) == {lua.APPEND, lua.CHECK}


def test_constants_are_written_into_the_lua_once_and_an_unknown_placeholder_fails() -> None:
    assert f"local MAXLEN = {lua.STREAM_MAXLEN}\n" in lua.APPEND
    assert f"local ENDED_MAXLEN = {lua.ENDED_STREAM_MAXLEN}\n" in lua.FINISH
    assert "local BUCKETS = {" + ", ".join(map(str, lua.DURATION_BUCKETS)) + "}" in lua.FINISH
    assert f"'{keys.STATS}'" in lua.CREATE and f'"{jobstore.ATTEMPT_PLACEHOLDER}"' in lua.CLAIM
    with pytest.raises(ValueError, match=r"unknown placeholder \$\{NOPE\}"):
        lua.substitute("local x = ${NOPE}", "x.lua")
    with pytest.raises(ValueError, match="malformed placeholder"):
        lua.substitute("local x = ${not-a-name}", "x.lua")


def test_the_worker_loads_its_scripts_again_after_redis_forgot_them(r: redis.Redis) -> None:
    # Given a running job, and a Redis that forgot its scripts (as a restart does)
    job_id = running_job(r)
    r.script_flush()
    # Then the worker's transitions load them again and run
    assert jobstore.renew(r, job_id, 1, "w1", 60_000) is jobstore.Renewal.RENEWED
    assert jobstore.append(r, job_id, 1, [(1, "{}")]) == 1
    assert r.script_exists(scripts.SCRIPTS["RENEW"].sha, scripts.SCRIPTS["APPEND"].sha) == [True, True]


def test_a_job_process_never_loads_a_script_and_says_so_until_its_worker_does(r: redis.Redis,
                                                                              redis_url: str) -> None:
    version = str(r.info("server")["redis_version"])
    if int(version.split(".")[0]) < 7:
        pytest.skip(f"a job's own Redis user needs Redis 7 (read-only key rules); this one is {version}")
    # Given a job process connected as its attempt's user, and a Redis that forgot its scripts
    job_id = running_job(r)
    credential = credentials.AttemptCredential(r, redis_url, job_id, 1)
    given = credential.create()
    assert credential.scoped
    job = redis.Redis.from_url(given.url, username=given.username, password=given.password, decode_responses=True)
    try:
        assert jobstore.append(job, job_id, 1, [(1, "{}")]) == 1  # the worker loaded them for it
        r.script_flush()
        # When it sends its events or checks it may publish, it is refused, and told why
        for call in (lambda: jobstore.append(job, job_id, 1, [(2, "{}")]),
                     lambda: jobstore.check_current(job, job_id, 1, 100)):
            with pytest.raises(redis.exceptions.NoPermissionError, match="only run the scripts its worker loaded"):
                call()
        assert r.script_exists(*(scripts.SHAS[s] for s in scripts.JOB_SCRIPTS)) == [False, False]
        # Then once its worker made its user again (as after a restart), it goes on where it was
        credential.ensure()
        assert jobstore.append(job, job_id, 1, [(1, "{}"), (2, "{}")]) == 1
        assert jobstore.check_current(job, job_id, 1, 100) is jobstore.PublishCheck.OK
    finally:
        job.close()
        credential.delete()
