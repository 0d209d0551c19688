"""Each attempt's own Redis credential: a Redis ACL user that reaches only its own job's keys.

The job process runs user code, so it never gets the worker's Redis password. Its user may
read its job's record, lease and cancel flag, append to its job's event stream, and run the
fenced scripts of `jobstore`; it reaches no other key. The worker deletes the user when the
attempt ends, and the reaper (or the next claim) when the attempt is fenced off: Redis then
closes the user's connections too. ACL users are not kept across a Redis restart, nor
replicated to a replica that a failover promotes, so the worker makes the user again once
Redis is back, and whenever its renewal finds the primary without it (a failover behind
Sentinel or behind a managed service's DNS name; a client that reconnected by itself).

Read-only key rules (``%R~``) need Redis 7. On an older Redis, or where the worker's own user
may not manage users, the job process gets the worker's credential instead, with a warning:
docs/reliability.md says what a method can reach then.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis

from deepe_tasks.core import keys, scripts

log = logging.getLogger(__name__)

# What the job process does with Redis: the fenced scripts (publisher, publish check), reading
# the cancel flag, and connecting.
# EVALSHA only: the worker loads the scripts, so a method cannot run Lua of its own (a script
# that never ends would stall Redis for everyone).
# WAIT: its events and its publish check count only once replicated (DEEPE_REDIS_MIN_REPLICAS).
COMMANDS = ("+ping", "+hello", "+auth", "+select", "+evalsha", "+hget", "+xrevrange", "+xadd", "+get", "+pttl",
            "+wait")


def username(job_id: str, attempt: int) -> str:
    return f"deepe-attempt-{job_id}-{attempt}"


def rules(job_id: str) -> list[str]:
    """The ACL rules of an attempt of ``job_id``: its own stream, and its record, lease and cancel
    flag read-only."""
    return [*COMMANDS, f"~{keys.events(job_id)}", f"%R~{keys.job(job_id)}", f"%R~{keys.lease(job_id)}",
            f"%R~{keys.cancel(job_id)}",
            # A selector: SET on its sync key alone (jobstore.barrier), not on its stream.
            f"(+set ~{keys.sync(job_id)})"]


@dataclass(frozen=True)
class Credential:
    """How a job process connects: the worker's URL without its password, and its own user."""

    url: str
    username: str | None
    password: str | None


def strip_auth(url: str) -> str:
    """``url`` without a user or password (each host's, in a ``sentinel://a;sentinel://b`` list)."""
    out = []
    for part in url.split(";"):
        parts = urlsplit(part)
        out.append(urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])))
    return ";".join(out)


class AttemptCredential:
    """The ACL user of one attempt, made by the worker at its start."""

    def __init__(self, client: redis.Redis, url: str, job_id: str, attempt: int) -> None:
        self.client = client
        self.url = url
        self.job_id = job_id
        self.attempt = attempt
        self.username = username(job_id, attempt)
        self.password = secrets.token_hex(24)
        self.scoped = False

    def create(self) -> Credential:
        """Make the user; fall back to the worker's own credential where Redis refuses."""
        try:
            self.ensure()
            self.scoped = True
        except redis.ResponseError as e:
            log.warning("job %s: Redis refused a user of its own for the job process (%s); it gets the "
                        "worker's credential (docs/reliability.md: what a method can reach)", self.job_id, e)
            return Credential(url=self.url, username=None, password=None)
        return Credential(url=strip_auth(self.url), username=self.username, password=self.password)

    def ensure(self) -> None:
        """(Re)make the user, as after a Redis restart; the same password, so nothing changes for
        the job process but that it can connect again."""
        for script in scripts.JOB_SCRIPTS:
            self.client.script_load(script)
        self.client.execute_command("ACL", "SETUSER", self.username, "reset", "on", f">{self.password}",
                                    *rules(self.job_id))

    def ensure_present(self) -> None:
        """Make the user again where the primary lacks it or the job's scripts: a replica that a
        failover promoted has neither (Redis does not replicate ACL SETUSER or SCRIPT LOAD)."""
        if not self.scoped:
            return
        shas = [scripts.SHAS[script] for script in scripts.JOB_SCRIPTS]
        if self.client.acl_getuser(self.username) is None or not all(self.client.script_exists(*shas)):
            log.warning("job %s: the Redis primary lacks the job process's user (a failover?); making it again",
                        self.job_id)
            self.ensure()

    def delete(self) -> None:
        if self.scoped:
            revoke(self.client, self.job_id, self.attempt)


def revoke(client: redis.Redis, job_id: str, attempt: int) -> None:
    """Delete an attempt's user, which also closes its connections; nothing if there is none.

    Best effort, with a warning: a user left behind is deleted by the next claim or the reaper,
    and its attempt is fenced off anyway.
    """
    try:
        client.acl_deluser(username(job_id, attempt))
    except redis.RedisError as e:
        log.warning("job %s: could not delete the Redis user of attempt %d: %s", job_id, attempt, e)
