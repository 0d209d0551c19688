"""Processes of a run, found in /proc: a tree, whether one lives, and the run's marker.

Every process the cluster starts carries `DEEPE_NEMESIS_RUN=<tag>` in its environment, which
its pool process, zygote and job processes inherit: `marked` finds them all, whoever their
parent is now.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

MARKER = "DEEPE_NEMESIS_RUN"


def children() -> dict[int, list[int]]:
    """Every process's children, from /proc (a stat line's 4th field, after the name in brackets)."""
    found: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        found.setdefault(ppid, []).append(int(entry.name))
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    kids, out, todo = children(), [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def marked(tag: str) -> list[int]:
    """The live processes of run ``tag``: those whose environment carries its marker."""
    needle = f"{MARKER}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
