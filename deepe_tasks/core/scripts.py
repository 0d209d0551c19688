"""Running the Lua of `core/lua` on a client: by EVALSHA, loaded where missing, and, for the
writes that must survive a failover, acknowledged by DEEPE_REDIS_MIN_REPLICAS replicas (WAIT)."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aredis
from redis.commands.core import Script

from deepe_tasks.core import keys, lua
from deepe_tasks.core.errors import NotReplicated
from deepe_tasks.core.settings import get_settings

# The scripts a job process runs, by EVALSHA only: the worker loads them (`credentials`) before
# the job process starts, and again once a restarted Redis is back.
JOB_SCRIPTS = (lua.APPEND, lua.CHECK)
# redis-py's `Script` runs a script by EVALSHA (a fleet's renewals need not send its text each
# time) and, on NOSCRIPT (a new Redis, or one that restarted: scripts are not kept), loads it
# with SCRIPT LOAD and runs it again. It hashes the text with a client's encoding and runs on
# that client unless told another: every call here names its own, so this one never connects.
_TEXT_ONLY = redis.Redis()
SCRIPTS: dict[str, Script] = {name: _TEXT_ONLY.register_script(source) for name, source in lua.SOURCES.items()}
SHAS = {lua.SOURCES[name]: script.sha for name, script in SCRIPTS.items()}  # by text (bench/fleet.py)


def run(client: redis.Redis, script: str, names: list[str], *args: Any) -> Any:
    """Run script ``script`` (a name of `lua.PARTS`) with keys ``names`` on ``client``.

    A job process's user may not load a script (it may run only those its worker loaded): where
    one is missing, it gets an error that says so, and tries again later (its worker loads them
    again once Redis is back)."""
    try:
        return SCRIPTS[script](names, args, client=client)
    except redis.exceptions.NoPermissionError as e:
        if "script|load" not in str(e):
            raise
        raise redis.exceptions.NoPermissionError(
            f"Redis does not have the {script} script (it restarted, or its scripts were flushed), and this "
            f"user may only run the scripts its worker loaded: the worker loads them again ({e})") from e
    except redis.ResponseError as e:
        refused = _no_replicas(e, f"The {script.lower()} of a job")
        if refused is e:
            raise
        raise refused from e


def _load(client: redis.Redis, script: str) -> None:
    try:
        client.script_load(lua.SOURCES[script])
    except redis.exceptions.NoPermissionError as e:
        raise redis.exceptions.NoPermissionError(
            f"Redis does not have the {script} script (a new primary after a failover, or a restart), and this "
            f"user may only run the scripts its worker loaded: the worker loads them again ({e})") from e


def _no_replicas(e: Exception, what: str) -> Exception:
    """``e``, or NotReplicated where it is the refusal of a primary that may not take writes
    while too few replicas are in sync (`min-replicas-to-write`): the same want of replicas as
    a WAIT that none answered."""
    if isinstance(e, redis.ResponseError) and "NOREPLICAS" in str(e):
        return NotReplicated(
            f"{what} was refused by the Redis primary: too few replicas are in sync for its "
            f"min-replicas-to-write ({e}). Check the replicas (`INFO replication` on the primary).")
    return e


def _replicated(acked: Any, wanted: int, what: str) -> None:
    if isinstance(acked, Exception):
        raise acked
    if int(acked) < wanted:
        raise NotReplicated(
            f"{what} reached the Redis primary but only {int(acked)} of DEEPE_REDIS_MIN_REPLICAS={wanted} replicas "
            f"within DEEPE_REDIS_REPLICATION_TIMEOUT={get_settings().redis_replication_timeout:g} s: a failover "
            "could lose it. Check the replicas (`INFO replication` on the primary).")


def _wait_ms(client: redis.Redis | aredis.Redis) -> int:
    """How long a WAIT may block: DEEPE_REDIS_REPLICATION_TIMEOUT, but never past three quarters of
    the client's own socket timeout (the lease client's is short), so that a replica that does not
    answer reads as NotReplicated, not as a Redis that timed out."""
    timeout = get_settings().redis_replication_timeout
    socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    if socket_timeout:
        timeout = min(timeout, 0.75 * float(socket_timeout))
    return max(1, int(timeout * 1000))


def run_durable(client: redis.Redis, script: str, names: list[str], *args: Any) -> Any:
    """`run`, returning only once DEEPE_REDIS_MIN_REPLICAS replicas have the script's writes
    (and every write the primary made before them); NotReplicated if they do not within
    DEEPE_REDIS_REPLICATION_TIMEOUT. WAIT covers the writes of its own connection: the script
    and the WAIT go down one connection, in one pipeline (not MULTI: WAIT would not wait there)."""
    wanted = get_settings().min_replicas
    if wanted <= 0:
        return run(client, script, names, *args)
    for _ in range(2):
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(SCRIPTS[script].sha, len(names), *names, *args)
        pipe.wait(wanted, _wait_ms(client))
        reply, acked = pipe.execute(raise_on_error=False)
        if isinstance(reply, redis.exceptions.NoScriptError):
            _load(client, script)  # the script did not run: run it again, once it is there
            continue
        if isinstance(reply, Exception):
            raise _no_replicas(reply, f"The {script.lower()} of a job")
        _replicated(acked, wanted, f"The {script.lower()} of a job")
        return reply
    raise redis.exceptions.NoScriptError(f"Redis forgot the {script} script as soon as it was loaded")


# How long a barrier's key lives: it only needs to outlive its WAIT.
SYNC_TTL_MS = 60_000


def _barrier(client: Any, job_id: str, wanted: int, read: tuple[str, Any, Any] | None = None) -> Any:
    """The pipeline of a barrier (after ``read``: a command's name, args and kwargs): a write to
    the job's sync key, then WAIT, on one connection."""
    pipe = client.pipeline(transaction=False)
    if read is not None:
        command, args, kwargs = read
        getattr(pipe, command)(*args, **kwargs)
    if wanted > 0:
        pipe.set(keys.sync(job_id), "1", px=SYNC_TTL_MS)
        pipe.wait(wanted, _wait_ms(client))
    return pipe


def _passed(replies: list[Any], wanted: int, what: str) -> Any:
    """The first reply of a barrier's pipeline, once its write and WAIT passed."""
    for reply in replies[:-1] if wanted > 0 else replies:
        if isinstance(reply, Exception):
            raise _no_replicas(reply, what)
    if wanted > 0:
        _replicated(replies[-1], wanted, what)
    return replies[0]


def barrier(client: redis.Redis, job_id: str, what: str = "A write") -> None:
    """Return once DEEPE_REDIS_MIN_REPLICAS replicas have every write the primary made so far
    (a submit's record and Celery message, a job's end, the lease a publish check read);
    NotReplicated if they do not within DEEPE_REDIS_REPLICATION_TIMEOUT. Nothing to do with no
    replicas asked for. The write to the job's sync key puts this connection's replication
    offset at the primary's latest, which WAIT then waits for."""
    wanted = get_settings().min_replicas
    if wanted > 0:
        _passed(_barrier(client, job_id, wanted).execute(raise_on_error=False), wanted, what)


def read_replicated(client: redis.Redis, job_id: str, what: str, command: str, *args: Any, **kwargs: Any) -> Any:
    """The reply of read ``command`` (a client method's name) with ``args``, returned only once
    DEEPE_REDIS_MIN_REPLICAS replicas have all it could have read; NotReplicated if they do not
    within DEEPE_REDIS_REPLICATION_TIMEOUT. The read, the write and the WAIT go down one
    connection: a barrier on another connection could reach another server (a failover)."""
    wanted = get_settings().min_replicas
    pipe = _barrier(client, job_id, wanted, (command, args, kwargs))
    return _passed(pipe.execute(raise_on_error=False), wanted, what)


async def read_replicated_async(client: aredis.Redis, job_id: str, what: str, command: str, *args: Any,
                                **kwargs: Any) -> Any:
    """`read_replicated` on an asyncio client (the API's event streams)."""
    wanted = get_settings().min_replicas
    pipe = _barrier(client, job_id, wanted, (command, args, kwargs))
    return _passed(await pipe.execute(raise_on_error=False), wanted, what)
