"""The Lua of the job state machine: one script per transition of `jobstore.py`, each in a
``.lua`` file of this package.

Each script checks the job's state (and, for an attempt's writes, its fencing token) and then
writes everything the transition changes, or nothing. Redis runs a script atomically but does
not undo the writes of a script that fails half-way, so every script that writes more than
one key checks the types of the keys it writes before its first write.

Besides the record, each transition keeps what reads must not compute from the whole history:
the per-state and per-method indexes (sorted sets by submit time), the counters of
`deepe:stats` (for /metrics), and, when a job ends, the expiry of all Redis keeps of it
(DEEPE_JOB_RETENTION), with the `deepe:expiring` entry by which the indexes drop it.

A script is its preludes (the ``_*.lua`` files: shared names and helpers) and its own file,
joined in the order that `PARTS` gives. The Python constants that the Lua is written with (key
names, stream lengths, the duration buckets) stand in the files as ``${NAME}``: they are written
in once, when this module is imported. They are constants, so they are not sent as ARGV with
every call. Each script's first lines say which keys it gets in KEYS and which it does not.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from importlib import resources

from deepe_tasks.core import keys

# A running job's stream keeps about this many entries, an ended one's about the second
# (XADD/XTRIM MAXLEN ~): every event is also in the job folder's events.jsonl.
STREAM_MAXLEN = 5000
ENDED_STREAM_MAXLEN = 1000
# Upper bounds (seconds) of deepe_job_duration_seconds' buckets, counted in deepe:stats.
DURATION_BUCKETS = (60, 300, 900, 3600, 4 * 3600, 12 * 3600, 48 * 3600)
# What a claim's `started` event holds (as a JSON string) where the attempt goes: the claim's
# script writes in the attempt that it counted.
ATTEMPT_PLACEHOLDER = "@ATTEMPT@"

# The job process's scripts get the fence alone; the transitions get the names and helpers too.
_FENCE = ("_fence",)
_TRANSITION = ("_names", "_fence", "_transition")
# Each script, by the name it is exported under: its files (without ".lua"), in order.
PARTS: dict[str, tuple[str, ...]] = {
    "CREATE": (*_TRANSITION, "create"),
    "CLAIM": (*_TRANSITION, "claim"),
    "RENEW": (*_FENCE, "renew"),
    "APPEND": (*_FENCE, "append"),
    "CHECK": (*_FENCE, "check"),
    "FINISH": (*_TRANSITION, "finish"),
    "REQUEUE": (*_TRANSITION, "requeue"),
    "CANCEL": (*_TRANSITION, "cancel"),
    "FAIL_QUEUED": (*_TRANSITION, "fail_queued"),
    "FORGET_RUNNING": ("forget_running",),
    "SET_PID": (*_FENCE, "set_pid"),
    "PRUNE": (*_TRANSITION, "prune"),
    "PAGE": ("page",),
}

# What each placeholder stands for. Key names go between single quotes in the Lua.
CONSTANTS: dict[str, str] = {
    "JOBS_INDEX": keys.JOBS_INDEX, "EXPIRING": keys.EXPIRING, "STATS": keys.STATS, "QUEUES": keys.QUEUES,
    "METHOD_USERS": keys.METHOD_USERS, "IDS": keys.IDS,
    "BY_STATUS": keys.by_status(""), "BY_METHOD": keys.by_method(""), "JOB": keys.job(""),
    "SOURCE": keys.method_source(""), "WEBHOOKS_ON": keys.WEBHOOKS_ON, "WEBHOOK_OUTBOX": keys.WEBHOOK_OUTBOX,
    "STREAM_MAXLEN": str(STREAM_MAXLEN), "ENDED_STREAM_MAXLEN": str(ENDED_STREAM_MAXLEN),
    "DURATION_BUCKETS": ", ".join(str(b) for b in DURATION_BUCKETS),
    "ATTEMPT_PLACEHOLDER": ATTEMPT_PLACEHOLDER,  # inside a Lua pattern: no magic characters
}
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
if any(re.search(r"['\\\n]", v) for v in CONSTANTS.values()) or re.search(r"[\^$()%.\[\]*+?-]", ATTEMPT_PLACEHOLDER):
    raise ValueError(f"a constant would end a Lua string, or the attempt placeholder mean more in a pattern: {CONSTANTS}")


def substitute(text: str, name: str, constants: Mapping[str, str] = CONSTANTS) -> str:
    """``text`` (of file ``name``) with each ``${NAME}`` replaced by its constant; a placeholder
    that is not one fails, here rather than as a Lua syntax error in Redis."""
    def value(match: re.Match[str]) -> str:
        if match.group(1) not in constants:
            raise ValueError(f"{name}: unknown placeholder {match.group(0)}; the known ones: {sorted(constants)}")
        return constants[match.group(1)]

    out = _PLACEHOLDER.sub(value, text)
    if "${" in out:
        raise ValueError(f"{name}: a malformed placeholder (write ${{NAME}}, NAME in letters, digits and _)")
    return out


@functools.cache
def part(name: str) -> str:
    """One .lua file of this package, its placeholders written in."""
    return substitute(resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8"), f"{name}.lua")


def lua_files() -> set[str]:
    """The names (without ".lua") of the .lua files in this package."""
    return {f.name[:-4] for f in resources.files(__name__).iterdir() if f.name.endswith(".lua")}


# Each script's text, by name: what is sent to SCRIPT LOAD (and hashed for EVALSHA).
SOURCES: dict[str, str] = {script: "".join(part(p) for p in parts) for script, parts in PARTS.items()}

CREATE = SOURCES["CREATE"]
CLAIM = SOURCES["CLAIM"]
RENEW = SOURCES["RENEW"]
APPEND = SOURCES["APPEND"]
CHECK = SOURCES["CHECK"]
FINISH = SOURCES["FINISH"]
REQUEUE = SOURCES["REQUEUE"]
CANCEL = SOURCES["CANCEL"]
FAIL_QUEUED = SOURCES["FAIL_QUEUED"]
FORGET_RUNNING = SOURCES["FORGET_RUNNING"]
SET_PID = SOURCES["SET_PID"]
PRUNE = SOURCES["PRUNE"]
PAGE = SOURCES["PAGE"]
