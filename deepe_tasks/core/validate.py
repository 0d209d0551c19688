"""One validation layer for what clients send: every identifier that reaches a Redis key or a
path, and every value that reaches serialisation, is checked here, at the edge, once.

Each check returns the value it accepted or raises `InvalidParams` (HTTP 422, CLI exit 2) with
a sentence that names the problem and the fix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
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
MAX_PARAM_NAME = 128  # characters in a parameter's name: a longer one is a mistake, not a name
MAX_INT_BITS = 63  # a number beyond a signed 64-bit integer overflows the libraries a method calls
HUGE_INT_BITS = 14_000  # about 4,200 digits: refused even before typing (Python prints at most 4,300)
MAX_NAME_BYTES = 255  # bytes in one component of a path: the limit of every Linux file system
# A lone surrogate is valid JSON ("\udc80") and what Python makes of a non-UTF-8 byte in argv,
# but it cannot be written as UTF-8: not to Redis, not to a job process, not in an answer.
SURROGATE = re.compile(r"[\ud800-\udfff]")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SHOWN = 80  # characters of a value that an error message repeats


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


def params(value: Any, *, numbers: bool = True) -> dict[str, Any]:
    """Parameters: a JSON object of bounded depth whose names are at most 128 characters, with
    only UTF-8 text and no NUL in any string or name, and (with ``numbers``) no infinite or NaN
    number and no integer beyond 64 bits. Submit checks the numbers once the platform's own
    parameters are typed, so that theirs are refused with their allowed range. (The total size
    is checked with the types, in `params.parse_params`.)"""
    if not isinstance(value, dict):
        raise InvalidParams(f"params must be an object of NAME: value pairs, not {type(value).__name__}.")
    for key in value:
        if isinstance(key, str) and len(key) > MAX_PARAM_NAME:
            raise InvalidParams(f"The parameter name {shown(key, 40)} is {len(key)} characters long, over the limit "
                                f"of {MAX_PARAM_NAME}; use a short name (put long text in a value or in a file).")
    _walk(value, "params", 0, numbers)
    return value


def shown(value: Any, limit: int = SHOWN) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for an error message: a 1 MB value or
    a 10,000-digit number is named, not repeated. (repr escapes surrogates and control
    characters, so the message itself is always printable UTF-8.)"""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def utf8_text(value: str, where: str) -> str:
    """Refuse a string that cannot be written as UTF-8 (a lone surrogate)."""
    found = SURROGATE.search(value)
    if found is None:
        return value
    code = ord(found.group())
    if 0xDC80 <= code <= 0xDCFF:  # how Python keeps a byte that is not UTF-8 (argv, file names)
        why = (f"it holds the byte 0x{code - 0xDC00:02X}, which is not UTF-8 (a Latin-1 terminal or file?); "
               "give it as UTF-8 text")
    else:
        why = f"it holds a lone surrogate (U+{code:04X}), which no UTF-8 text can; give it as UTF-8 text"
    raise InvalidParams(f"{where} is not valid UTF-8 text: {why}.")


def _walk(value: Any, where: str, depth: int, numbers: bool) -> None:
    if depth > MAX_PARAM_DEPTH:
        raise InvalidParams(f"{where} is nested more than {MAX_PARAM_DEPTH} levels deep; flatten it.")
    if isinstance(value, str):
        utf8_text(value, where)
        if "\x00" in value:
            raise InvalidParams(f"{where} contains a NUL character; remove it (paths and names cannot hold one).")
    elif numbers and isinstance(value, float) and not math.isfinite(value):
        raise InvalidParams(f"{where} is {value!r}; use a finite number.")
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > (
            MAX_INT_BITS if numbers else HUGE_INT_BITS):
        raise InvalidParams(f"{where} is {shown(value)}, beyond a 64-bit integer; use a number from -2**63 to "
                            "2**63-1, or pass it as a string.")
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(str(key), f"{where} name {shown(str(key), 40)}", depth + 1, numbers)
            _walk(item, f"{where}[{shown(str(key), 40)}]", depth + 1, numbers)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _walk(item, f"{where}[{i}]", depth + 1, numbers)


def path_text(value: str, name: str) -> str:
    """Refuse a path that no file system takes: a control character (a newline, a tab), or a
    component longer than 255 bytes."""
    utf8_text(value, name)
    control = CONTROL.search(value)
    if control is not None:
        raise InvalidParams(f"{name}={shown(value)} contains the control character {control.group()!r}; paths "
                            "cannot hold newlines, tabs or other control characters, so remove it.")
    for part in Path(value).parts:
        if len(part.encode()) > MAX_NAME_BYTES:
            raise InvalidParams(f"{name}={shown(value)} has a folder or file name of {len(part.encode())} bytes "
                                f"({shown(part, 40)}), over the file system's limit of {MAX_NAME_BYTES}; "
                                "shorten that name.")
    return value


def input_path_allowed(path: str | Path, storage_root: Path, roots: Sequence[Path], name: str = "path") -> str | None:
    """Whether a job may read ``path``: None if it resolves (symlinks followed, a relative path
    under ``storage_root``) inside the storage or one of ``roots`` (DEEPE_INPUT_ROOTS), else the
    sentence that refuses it. It touches nothing but the file system's links, so the submit
    side and the worker can both ask it."""
    storage = storage_root.expanduser().resolve()
    given = Path(path).expanduser()
    try:
        resolved = (given if given.is_absolute() else storage / given).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
        return printable(f"{name}={shown(str(path))} cannot be resolved ({e}); give a path inside "
                         f"DEEPE_STORAGE={storage}.")
    allowed = [storage, *(r.expanduser().resolve() for r in roots)]
    if any(resolved.is_relative_to(folder) for folder in allowed):
        return None
    where = f" (it resolves to {resolved})" if str(resolved) != str(path) else ""
    return printable(f"{name}={shown(str(path))}{where} is outside DEEPE_STORAGE={storage} and every folder of "
                     "DEEPE_INPUT_ROOTS, so a job may not read it; put the file under the storage, or add its folder "
                     "to DEEPE_INPUT_ROOTS (comma-separated) on the submitting side and on the workers.")


def printable(text: str) -> str:
    """``text`` with any byte a file name held that is not UTF-8 written as an escape (\\udce9),
    so that a message naming a path can always be sent and printed."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def duration(seconds: float) -> str:
    """A number of seconds as a person reads it: 90 s, 2 h, 30 days (the largest whole-ish unit)."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and (seconds % size == 0 or seconds >= 10 * size):
            value = seconds / size
            text = f"{value:.0f}" if value == int(value) or value >= 10 else f"{value:.1f}"
            return f"{text} {'day' if unit == 'days' and text == '1' else unit}"
    return f"{seconds:g} s"
