"""One validation layer for what clients send: every identifier that reaches a Redis key or a
path, and every value that reaches serialisation, is checked here, at the edge, once.

Each check returns the value it accepted or raises `InvalidParams` (HTTP 422, CLI exit 2) with
a sentence that names the problem and the fix.
"""

from __future__ import annotations

import math
import re
from typing import Any

from deepe_tasks.core.errors import InvalidParams

QUEUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Queue names become Redis list keys (and `NAME:1`…`NAME:9` for priorities): none may be one of
# deepe's, Celery's or kombu's own keys.
RESERVED_QUEUE_PREFIXES = ("deepe", "celery", "unacked", "_kombu")
ROUTED_RE = re.compile(r".*\.\d+gpus", re.IGNORECASE)
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
STREAM_ID_RE = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?")
MAX_U64 = 2**64 - 1
MAX_CURSOR = 2**62
MAX_PARAM_DEPTH = 32
MAX_TIME_LIMIT = 366 * 24 * 3600.0
MAX_GPUS = 64  # devices one job may ask for: the largest hosts have 8 or 16


def queue_name(name: Any) -> str:
    if not isinstance(name, str) or not QUEUE_RE.fullmatch(name):
        raise InvalidParams(f"queue {name!r} is not valid; use 1 to 64 letters, digits, '_', '-' or '.', "
                            "starting with a letter or digit (for example gpu or gpu-80gb).")
    if ROUTED_RE.fullmatch(name):
        raise InvalidParams(f"queue {name!r} ends like the queue of a multi-device job (QUEUE.<N>gpus); name the "
                            "queue without that ending and submit with gpus=N.")
    if name.lower().startswith(RESERVED_QUEUE_PREFIXES):
        raise InvalidParams(f"queue {name!r} is reserved (names starting with "
                            f"{', '.join(RESERVED_QUEUE_PREFIXES)} are the cluster's own keys); pick another name.")
    return name


def queue_names(names: str) -> list[str]:
    """A comma-separated list of queues, as `deepe worker --queues` takes it."""
    return [queue_name(q.strip()) for q in names.split(",") if q.strip()]


def gpus(value: Any) -> int:
    """How many devices a job trains on (one rank each)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_GPUS:
        raise InvalidParams(f"gpus={value!r} is not valid; allowed: a whole number of devices from 1 to {MAX_GPUS}.")
    return value


def job_id(value: Any) -> str:
    if not isinstance(value, str) or not JOB_ID_RE.fullmatch(value):
        raise InvalidParams(f"job id {value!r} is not valid; use 1 to 128 letters, digits, '_', '-' or '.', "
                            "starting with a letter or digit (it names a folder and Redis keys).")
    return value


def stream_id(value: Any, what: str = "since") -> str:
    """A Redis stream id to read after: `0`, `MS` or `MS-SEQ`, each part a 64-bit number."""
    if value in ("0", "-"):
        return "0"
    match = STREAM_ID_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None or any(int(part) > MAX_U64 for part in match.groups() if part is not None):
        raise InvalidParams(f"{what} {value!r} is not a stream id; use an event id such as 1764000000000-0, "
                            "or 0 for the start.")
    return str(value)


def cursor(value: Any) -> int:
    text = str(value)
    if not text.isdigit() or int(text) > MAX_CURSOR:
        raise InvalidParams(f"cursor {value!r} is not valid; pass the next_cursor of the previous page.")
    return int(text)


def time_limit(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= MAX_TIME_LIMIT:
        raise InvalidParams(f"time_limit={value!r} is not valid; allowed: a number of seconds > 0 and at most "
                            f"{MAX_TIME_LIMIT:.0f} (a year).")
    return float(value)


def params(value: Any) -> dict[str, Any]:
    """Parameters: a JSON object of bounded depth, with no NUL in any string and no infinite or
    NaN number. (Their total size is checked with their types, in `params.parse_params`.)"""
    if not isinstance(value, dict):
        raise InvalidParams(f"params must be an object of NAME: value pairs, not {type(value).__name__}.")
    _walk(value, "params", 0)
    return value


def _walk(value: Any, where: str, depth: int) -> None:
    if depth > MAX_PARAM_DEPTH:
        raise InvalidParams(f"{where} is nested more than {MAX_PARAM_DEPTH} levels deep; flatten it.")
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidParams(f"{where} contains a NUL character; remove it (paths and names cannot hold one).")
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidParams(f"{where} is {value!r}; use a finite number.")
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(str(key), f"{where} key {str(key)[:40]!r}", depth + 1)
            _walk(item, f"{where}[{str(key)[:40]!r}]", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _walk(item, f"{where}[{i}]", depth + 1)
