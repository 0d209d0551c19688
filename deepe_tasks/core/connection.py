"""Redis connections, from the one settings object: one server (``redis://``, ``rediss://``,
``unix://``) or the primary that Redis Sentinel names (``sentinel://``).

Every client deepe makes comes from `connect` (or `connect_async`): under Sentinel it asks the
sentinels for the primary on each new connection, so a client whose primary died or was
demoted reaches the new one by itself, at its next command after the failed one. Behind a
plain URL whose DNS name a managed service moves to the replica it promotes, a sync client's
connection to the demoted primary drops itself at its first READONLY reply, so that the next
one resolves the name again (`FollowsTheName`; the API's event streams, asyncio, end at any
error instead, and their clients reconnect on new connections).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from deepe_tasks.core.errors import BrokerUnavailable, ConfigError
from deepe_tasks.core.settings import (
    Settings,
    get_settings,
    is_sentinel,
    redis_ssl_options,
    safe_url,
)

SENTINEL_TIMEOUT = 1.0  # seconds per sentinel asked for the primary


def tls_options(url: str) -> dict[str, str]:
    """The settings' TLS options for a client of ``url`` (none for a redis:// URL)."""
    return redis_ssl_options(get_settings().model_copy(update={"redis_url": url})) or {}


@dataclass(frozen=True)
class SentinelURL:
    """A ``sentinel://h1:p1;sentinel://h2:p2/db`` URL, as kombu parses it."""

    hosts: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None


def parse_sentinel(url: str) -> SentinelURL:
    """The sentinels, database and credentials of a ``sentinel://…;sentinel://…`` URL.

    Celery's transport reads the credentials and database of the part it connects through
    (the first, then the next after an error), so every part must give the same ones."""
    hosts: list[tuple[str, int]] = []
    seen: set[tuple[int, str | None, str | None]] = set()
    for part in url.split(";"):
        split = urlsplit(part.strip())
        if split.scheme != "sentinel" or not split.hostname:
            raise ConfigError(f"{safe_url(url)} is not a list of sentinels: write DEEPE_REDIS_URL as "
                              "sentinel://host1:26379;sentinel://host2:26379;sentinel://host3:26379/0.")
        hosts.append((split.hostname, split.port or 26379))
        try:
            db = int(split.path.strip("/") or 0)
        except ValueError as e:
            raise ConfigError(f"{safe_url(url)}: the database after a '/' must be a number.") from e
        seen.add((db, unquote(split.username) if split.username else None,
                  unquote(split.password) if split.password else None))
    if len(seen) > 1:
        raise ConfigError(f"The parts of DEEPE_REDIS_URL={safe_url(url)} name different databases or passwords: "
                          "write the same user:password@ and /db in every sentinel:// part (Celery reads them from "
                          "the part it connects through).")
    db, username, password = seen.pop()
    return SentinelURL(hosts, db, username, password)


def master_name(settings: Settings) -> str:
    if not settings.redis_sentinel_master:
        raise ConfigError(f"DEEPE_REDIS_URL={safe_url(settings.redis_url)} lists sentinels: set "
                          "DEEPE_REDIS_SENTINEL_MASTER to the name of the primary they watch (their "
                          "`sentinel monitor <name> …` line).")
    return settings.redis_sentinel_master


def _sentinel_parts(url: str, kwargs: dict[str, Any]) -> tuple[SentinelURL, str, dict[str, Any], dict[str, Any]]:
    settings = get_settings()
    parsed = parse_sentinel(url)
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT, "socket_connect_timeout": SENTINEL_TIMEOUT}
    if settings.redis_sentinel_password:
        sentinel_kwargs["password"] = settings.redis_sentinel_password
    # A username or password given by the caller (a job process's own user) wins over the URL's.
    server = {"db": parsed.db, "username": parsed.username, "password": parsed.password}
    server.update({k: v for k, v in kwargs.items() if v is not None or k not in server})
    return parsed, master_name(settings), sentinel_kwargs, server


class FollowsTheName(redis.Connection):
    """A connection to a plain ``redis://`` URL that drops itself when its server answers
    READONLY (a managed service demoted it, and kept the connection open), as redis-py's
    Sentinel connections do: the command fails with a ConnectionError, which a caller rides out
    like any outage (a client that retries sends it again at once: READONLY means it was not
    run), and the next connection resolves the URL's name again, to the new primary. (An
    UNBLOCKED reply, to a WAIT or a blocked read of a demoted server, stays an error: a WAIT
    sent again would resend the script before it.)"""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ReadOnlyError:
            self.disconnect()
            raise redis.ConnectionError("the Redis server behind this URL is a replica now (a failover?); "
                                        "connecting again") from None


class SSLFollowsTheName(FollowsTheName, redis.SSLConnection):
    """`FollowsTheName` over TLS (``rediss://``)."""


def follows_the_name(url: str) -> dict[str, Any]:
    """The connection class option for a plain URL: none for a Unix socket (no name to follow)."""
    classes: dict[str, type[redis.Connection]] = {"redis": FollowsTheName, "rediss": SSLFollowsTheName}
    found = classes.get(urlsplit(url).scheme.lower())
    return {"connection_class": found} if found else {}


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A client of ``url``: redis-py's own for one server, the sentinels' primary for a
    ``sentinel://`` URL. ``kwargs`` are redis-py's connection options."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs, **tls_options(url), **follows_the_name(url))
    parsed, name, sentinel_kwargs, server = _sentinel_parts(url, kwargs)
    # redis-py's retries within a command reconnect to the primary it had (the dead one): a
    # command fails at once instead, and the caller's next one asks the sentinels afresh.
    server["retry"] = Retry(NoBackoff(), 0)
    sentinel = Sentinel(parsed.hosts, sentinel_kwargs=sentinel_kwargs)
    client: redis.Redis = sentinel.master_for(name, redis_class=redis.Redis, **server)
    return client


def connect_async(url: str, **kwargs: Any) -> aredis.Redis:
    """`connect` for asyncio (the API's event streams)."""
    if not is_sentinel(url):
        return aredis.Redis.from_url(url, **kwargs, **tls_options(url))  # type: ignore[arg-type]
    parsed, name, sentinel_kwargs, server = _sentinel_parts(url, kwargs)
    sentinel = AsyncSentinel(parsed.hosts, sentinel_kwargs=sentinel_kwargs)
    client: aredis.Redis = sentinel.master_for(name, redis_class=aredis.Redis, **server)
    return client


@lru_cache(maxsize=8)
def _client(url: str, ssl_ca_certs: str | None, master: str | None) -> redis.Redis:
    # The CA and the master's name are part of the cache key: a changed setting gets a new client.
    return connect(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
                   health_check_interval=15, retry_on_timeout=True, encoding_errors="replace")


def get_redis(url: str | None = None) -> redis.Redis:
    settings = get_settings()
    ca = str(settings.redis_ca_certs) if settings.redis_ca_certs else None
    return _client(url or settings.redis_url, ca, settings.redis_sentinel_master)


def unreachable(client: redis.Redis, e: Exception) -> BrokerUnavailable:
    """The error for a Redis that does not answer, naming it (without its password)."""
    if isinstance(e, MasterNotFoundError):
        settings = get_settings()
        return BrokerUnavailable(
            f"No sentinel of {safe_url(settings.redis_url)} names a primary called "
            f"{settings.redis_sentinel_master!r} ({e}): start the sentinels, or check DEEPE_REDIS_URL and "
            "DEEPE_REDIS_SENTINEL_MASTER (the name in their `sentinel monitor` line).")
    kwargs = client.connection_pool.connection_kwargs
    if is_sentinel(get_settings().redis_url):
        return BrokerUnavailable(f"The Redis primary named by the sentinels of {safe_url(get_settings().redis_url)} "
                                 f"cannot be reached ({e}); check the primary and DEEPE_REDIS_URL.")
    return BrokerUnavailable(
        f"Redis at {kwargs.get('host')}:{kwargs.get('port')} cannot be reached ({e}); "
        "start it, or point DEEPE_REDIS_URL at a running one."
    )


def check_replicas(client: redis.Redis, wanted: int) -> None:
    """Raise ConfigError where the primary has fewer replicas connected than ``wanted``
    (DEEPE_REDIS_MIN_REPLICAS): every durable write would fail."""
    if wanted <= 0:
        return
    info: dict[str, Any] = client.info("replication")
    have = int(info.get("connected_slaves", 0))
    if have < wanted:
        raise ConfigError(
            f"DEEPE_REDIS_MIN_REPLICAS is {wanted}, but the Redis primary has {have} replica(s) connected: no "
            "submit, claim or lease renewal could be acknowledged. Start the replicas (and check that they "
            f"reach the primary), or set DEEPE_REDIS_MIN_REPLICAS={have}.")


def check_redis(settings: Settings) -> None:
    """What a worker checks before it starts: Redis answers (the sentinels name the primary) and
    has the replicas that DEEPE_REDIS_MIN_REPLICAS asks for; a sentence naming the fix if not."""
    client = get_redis()
    try:
        client.ping()
        check_replicas(client, settings.min_replicas)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise unreachable(client, e) from e
