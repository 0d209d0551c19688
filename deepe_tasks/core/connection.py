"""Redis connections, from the one settings object."""

from __future__ import annotations

from functools import lru_cache

import redis

from deepe_tasks.core.errors import BrokerUnavailable
from deepe_tasks.core.settings import get_settings, redis_ssl_options


def tls_options(url: str) -> dict[str, str]:
    """The settings' TLS options for a client of ``url`` (none for a redis:// URL)."""
    return redis_ssl_options(get_settings().model_copy(update={"redis_url": url})) or {}


@lru_cache(maxsize=8)
def _client(url: str, ssl_ca_certs: str | None) -> redis.Redis:
    # ssl_ca_certs is part of the cache key: a changed setting gets a new client.
    return redis.Redis.from_url(
        url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
        health_check_interval=15, retry_on_timeout=True, encoding_errors="replace", **tls_options(url),
    )


def get_redis(url: str | None = None) -> redis.Redis:
    settings = get_settings()
    ca = str(settings.redis_ca_certs) if settings.redis_ca_certs else None
    return _client(url or settings.redis_url, ca)


def unreachable(client: redis.Redis, e: Exception) -> BrokerUnavailable:
    """The error for a Redis that does not answer, naming it (without its password)."""
    kwargs = client.connection_pool.connection_kwargs
    return BrokerUnavailable(
        f"Redis at {kwargs.get('host')}:{kwargs.get('port')} cannot be reached ({e}); "
        "start it, or point DEEPE_REDIS_URL at a running one."
    )
