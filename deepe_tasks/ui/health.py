"""What `GET /healthz` answers, within a bound whatever state Redis is in."""

from __future__ import annotations

from functools import lru_cache

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from deepe_tasks.core import devices
from deepe_tasks.core.connection import connect

TIMEOUT = 1.0  # seconds per try: a probe (Kubernetes: 1 s by default) must get an answer, not a hang


@lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    # One retry: the first command after a Redis restart meets the pool's dead connection.
    return connect(url, decode_responses=True, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
                   retry=Retry(NoBackoff(), 1))


def check(url: str, stale_after: float) -> tuple[bool, int]:
    """(whether Redis answered, how many workers said they were up within ``stale_after`` s).

    Refused, timed out, loading its data after a restart, stopped: every way Redis can fail to
    answer is "no" here, never an exception (a probe reads a 500 as a broken API)."""
    client = _client(url)
    try:
        client.ping()
        return True, len(devices.live(client, stale_after))
    except (redis.RedisError, OSError):
        return False, 0
