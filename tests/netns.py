"""Separate network hosts on this machine, for partition tests.

A `NetHost` is a network namespace joined to the root namespace by a veth pair, with an
address of its own on each end. A process started with `NetHost.command` sees Redis only
through that link; `cut` takes the link down (packets are dropped, so connections hang
rather than fail fast, as in a real partition) and `heal` brings it back. It needs root and
a kernel that allows network namespaces; `available` says why not where it cannot work.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import tempfile
from itertools import count
from pathlib import Path

_numbers = count(1)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def available() -> str | None:
    """None if test hosts can be made here; else the reason they cannot."""
    if os.geteuid() != 0:
        return "partition tests need root (ip netns)"
    probe = f"deepe-probe-{os.getpid()}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"the kernel refused a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


class NetHost:
    """A test host: its own network namespace, reached over one veth link it can lose."""

    def __init__(self) -> None:
        n = next(_numbers)
        tag = f"{os.getpid() % 100000}{n}"
        self.name = f"deepe-{tag}"
        self.host_if = f"dph{tag}"[:15]  # the root namespace's end of the link
        self.ns_if = f"dpn{tag}"[:15]
        self.host_ip = self.ns_ip = ""  # a /30 of its own, chosen when it is made

    def create(self) -> NetHost:
        # Several test processes make hosts at once (pytest -n): a /30 that no interface holds
        # is chosen and taken under one lock, so no two hosts share an address.
        with (Path(tempfile.gettempdir()) / "deepe-netns.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = {int(x) for x in re.findall(r"inet 10\.213\.(\d+)\.", _ip("-o", "addr").stdout)}
            third = next(x for x in [*range((os.getpid() % 250) + 1, 251), *range(1, 251)] if x not in used)
            self.host_ip = f"10.213.{third}.1"
            self.ns_ip = f"10.213.{third}.2"
            return self._make()

    def _make(self) -> NetHost:
        steps = [
            ("netns", "add", self.name),
            ("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if),
            ("link", "set", self.ns_if, "netns", self.name),
            ("addr", "add", f"{self.host_ip}/30", "dev", self.host_if),
            ("link", "set", self.host_if, "up"),
            ("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if),
            ("-n", self.name, "link", "set", self.ns_if, "up"),
            ("-n", self.name, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                self.remove()
                raise RuntimeError(f"ip {' '.join(step)} failed: {done.stderr.strip()}")
        return self

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        """Partition the host: its link goes down, and packets over it are lost."""
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def remove(self) -> None:
        _ip("link", "del", self.host_if)  # deletes its peer too
        _ip("netns", "del", self.name)

    def __enter__(self) -> NetHost:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()
