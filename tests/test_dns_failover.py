"""A managed Redis's failover (ElastiCache, Memorystore, Azure Cache), against real processes: one
host name in a plain `redis://` URL, which the service moves to the replica it promotes, while
the old primary becomes that replica's replica. docs/operations.md tells such users to give
deepe the plain URL and DEEPE_REDIS_MIN_REPLICAS=1.

Two redis-servers on the same port of two loopback addresses (127.0.0.2 and 127.0.0.3) stand
for the primary and its replica; a line of /etc/hosts is the service's DNS record.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from deepe_tasks import JobStatus, submit
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.settings import get_settings
from deepe_tasks.fixtures.embedded import free_port, redis_server_binary
from tests.helpers import Worker, wait_for
from tests.test_failover import (
    assert_contiguous,
    assert_one_model,
    params,  # noqa: F401 (a fixture)
    settle,
    steps_by_attempt,
    train_slowly,
)

HOSTS = Path("/etc/hosts")
NAME = "deepe-managed-redis.test"
PRIMARY, REPLICA = "127.0.0.2", "127.0.0.3"


def write_hosts(text: str) -> None:
    """/etc/hosts in place (it may be a bind mount, which a rename cannot replace), written over
    and then cut: each version begins with the original lines, so that a test in another
    process resolving `localhost` meanwhile never reads a file without them."""
    with HOSTS.open("r+") as f:
        f.write(text)
        f.truncate()


class Managed:
    """Two redis-servers and the DNS record that names the primary."""

    def __init__(self, folder: Path, hosts: str) -> None:
        self.port = free_port()
        self.folder = folder
        self.hosts = hosts  # /etc/hosts as it was
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def point(self, ip: str) -> None:
        """The DNS record now names ``ip``."""
        write_hosts(self.hosts.rstrip("\n") + f"\n{ip} {NAME}\n")

    def start(self, ip: str, replica_of: str | None = None) -> None:
        args = [redis_server_binary(), "--bind", ip, "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", str(self.folder), "--logfile", str(self.folder / f"{ip}.log"), "--repl-diskless-sync-delay", "0"]
        if replica_of:
            args += ["--replicaof", replica_of, str(self.port)]
        self.procs[ip] = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: self._pings(ip), timeout=30)

    def _pings(self, ip: str) -> bool:
        try:
            return bool(self.client(ip).ping())
        except redis.ConnectionError:
            return False

    def client(self, ip: str) -> redis.Redis:
        return redis.Redis(host=ip, port=self.port, socket_timeout=5, decode_responses=True)

    def linked(self, replica: str) -> bool:
        return self.client(replica).info("replication").get("master_link_status") == "up"

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()


def _bindable(ip: str) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


@pytest.fixture
def managed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Managed]:
    if not os.access(HOSTS, os.W_OK):
        pytest.skip("/etc/hosts is not writable here: the test moves a host name with it")
    if not (_bindable(PRIMARY) and _bindable(REPLICA)):
        pytest.skip(f"this kernel cannot bind both {PRIMARY} and {REPLICA} on loopback")
    # (without a line an interrupted run may have left: the first match wins)
    original = "".join(line for line in HOSTS.read_text().splitlines(keepends=True) if NAME not in line)
    servers = Managed(tmp_path, original)
    try:
        servers.start(PRIMARY)
        servers.start(REPLICA, replica_of=PRIMARY)
        wait_for(lambda: servers.linked(REPLICA), timeout=30)
        servers.point(PRIMARY)
        monkeypatch.setenv("DEEPE_REDIS_URL", f"redis://{NAME}:{servers.port}/0")
        monkeypatch.setenv("DEEPE_REDIS_MIN_REPLICAS", "1")
        monkeypatch.delenv("DEEPE_REDIS_SENTINEL_MASTER", raising=False)
        get_settings.cache_clear()
        yield servers
    finally:
        write_hosts(original)
        get_settings.cache_clear()
        servers.stop()


def fail_over(managed: Managed, drop_clients: bool) -> None:
    """What the service does: the name moves to the replica, which is promoted, and the old
    primary becomes its replica, closing its clients' connections (or not)."""
    managed.point(REPLICA)
    managed.client(REPLICA).replicaof("NO", "ONE")
    managed.client(PRIMARY).replicaof(REPLICA, managed.port)
    if drop_clients:
        managed.client(PRIMARY).client_kill_filter(_type="normal", skipme=True)
    wait_for(lambda: managed.linked(PRIMARY), timeout=30)


@pytest.mark.e2e
def test_a_managed_redis_failover_moves_the_name_and_the_job_trains_on(
        managed: Managed, workers: list[Worker], tmp_path: Path, store: Path, storage: Path,
        params: dict[str, Any]) -> None:  # noqa: F811 (a fixture of test_failover)
    # Given a job training through the host name (lease TTL 10 s)
    w, job, output = train_slowly(store, storage, tmp_path, workers, params, "dns", 16, 0.4)

    # When the service fails over, closing the old primary's connections
    fail_over(managed, drop_clients=True)
    failed_over = time.monotonic()

    # Then the same attempt trains on and succeeds, each step in the stream once, one model
    # (before, the worker made the attempt's Redis user again under Sentinel only: the job
    # process could not write to the new primary, steps 4-16 never reached the stream, and the
    # attempt lost its lease at its publish), and a later job runs
    assert settle(job, timeout=300) is JobStatus.SUCCEEDED, (job.info().get("error"), w.log()[-4000:])
    steps = steps_by_attempt(job.id)
    assert list(steps) == [1], steps
    assert_contiguous(steps, 16)
    assert_one_model(output, job.id)
    after = submit("dns", {**params, "MAX_STEPS": 2, "step_sleep": 0, "OUTPUT_DIR": str(output) + "-after"},
                   queue="dns")
    assert settle(after, timeout=180) is JobStatus.SUCCEEDED, (after.info().get("error"), w.log()[-4000:])
    assert w.alive()
    print(f"\nmanaged failover: the job ended {time.monotonic() - failed_over:.1f} s after it")


def test_a_client_left_on_a_demoted_primary_connects_again_through_the_name(managed: Managed) -> None:
    # Given deepe's client of the URL, connected to the primary
    client = get_redis()
    client.set("k", "before")
    wait_for(lambda: managed.client(REPLICA).get("k") == "before", timeout=10)

    # When the service fails over without closing that connection
    fail_over(managed, drop_clients=False)

    # Then its next write reaches the new primary through the name: the READONLY reply (the
    # write was not made) drops the connection as an outage would, and redis-py's retry
    # connects again (before, every write failed with ReadOnlyError on that connection for good)
    client.set("k", "after")
    assert managed.client(REPLICA).get("k") == "after"
    assert managed.client(PRIMARY).info("replication")["role"] == "slave"
