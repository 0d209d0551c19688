"""A follower shows only the events a replica has, against real processes: a primary, its
replica and three sentinels (`tests/sentinel.py`), a real `deepe api` and the CLI's reader.

Events a primary takes while no replica acknowledges them can be lost with that primary; their
publisher then sends them again, under new ids, to the primary promoted in its place. A follower
that showed them the first time would show them twice (seen in CI, issue 25). Followers wait
for DEEPE_REDIS_MIN_REPLICAS replicas before they show an event, so they show each once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from deepe_tasks.core import jobstore, keys
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.events import read_events
from deepe_tasks.core.records import Event, EventKind
from deepe_tasks.core.settings import get_settings
from tests.helpers import wait_for
from tests.sentinel import Topology
from tests.sse_client import Follower, running_api

JOB = "replicated-reads"


@pytest.fixture
def topo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Topology]:
    """A primary, one replica and three sentinels; DEEPE_REDIS_MIN_REPLICAS is 1 (the default)."""
    with Topology(tmp_path / "redis", replicas=1) as topology:
        monkeypatch.setenv("DEEPE_REDIS_URL", topology.url)
        monkeypatch.setenv("DEEPE_REDIS_SENTINEL_MASTER", topology.master_name)
        monkeypatch.delenv("DEEPE_REDIS_MIN_REPLICAS", raising=False)
        get_settings.cache_clear()
        try:
            assert get_settings().min_replicas == 1
            yield topology
        finally:
            get_settings.cache_clear()


def append(client: redis.Redis, steps: list[int]) -> None:
    """What a publisher appends: one `log` event per step."""
    for step in steps:
        event = Event(kind=EventKind.LOG, job=JOB, attempt=1, step=step, metrics={"loss": 1.0 / step})
        client.xadd(keys.events(JOB), {"data": event.to_json()})


class CliFollower:
    """`deepe logs --follow`'s reader (`read_events(follow=True)`), in a thread."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in read_events(get_redis(), JOB, follow=True):
                if event.kind is EventKind.LOG and event.step is not None:
                    self.steps.append(event.step)
        except BaseException as e:  # noqa: BLE001 (shown by the test)
            self.error = e


def sse_steps(follower: Follower) -> list[int]:
    return [e["step"] for e in follower.events if e["kind"] == "log"]


@pytest.mark.e2e
def test_a_follower_shows_no_event_before_a_replica_has_it_so_none_twice_after_a_failover(
        topo: Topology, tmp_path: Path) -> None:
    # Given a running job's stream with steps 1-3, replicated, and two followers of it: an SSE
    # client of a real API (reconnecting with Last-Event-ID) and the CLI's reader
    client = get_redis()
    client.hset(keys.job(JOB), mapping={"status": "running", "attempts": 1})
    append(client, [1, 2, 3])
    jobstore.barrier(client, JOB)
    old = topo.primary_port()
    [replica] = [p for p in topo.server_ports() if p != old]
    with running_api(tmp_path / "api.log") as api:
        sse, cli = Follower(api, JOB), CliFollower()
        wait_for(lambda: sse_steps(sse) == [1, 2, 3] and cli.steps == [1, 2, 3], timeout=30)

        # When the primary takes steps 4-6 while its replica is cut off (stopped, and its link
        # closed by the primary, so that no byte of them reaches it), then dies
        topo.pause(replica)
        topo.client(old).client_kill_filter(_type="replica")
        append(topo.client(old), [4, 5, 6])
        time.sleep(3)  # longer than a WAIT's DEEPE_REDIS_REPLICATION_TIMEOUT (2 s)
        shown_before = (sse_steps(sse), list(cli.steps))
        topo.kill(old)
        topo.resume(replica)
        new = topo.wait_for_new_primary(old)
        assert new == replica
        held: list[Any] = topo.client(new).xrange(keys.events(JOB))  # type: ignore[assignment]
        assert len(held) == 3, "the promoted replica should hold steps 1-3 only"
        topo.restart(old)  # it rejoins as a replica, which acknowledges again
        topo.wait_settled()

        # And the publisher sends 4-6 again, to the new primary, then goes on and ends
        append(get_redis(), [4, 5, 6, 7])
        final = Event(kind=EventKind.SUCCEEDED, job=JOB, attempt=1, message="succeeded")
        get_redis().xadd(keys.events(JOB), {"data": final.to_json()})
        get_redis().hset(keys.job(JOB), "status", "succeeded")
        sse.thread.join(timeout=60)
        cli.thread.join(timeout=60)

    # Then each follower shows every step once, in order: neither showed 4-6 while no replica
    # had them
    assert sse_steps(sse) == [1, 2, 3, 4, 5, 6, 7], sse_steps(sse)
    assert sse.events[-1]["kind"] == "succeeded" and sse.reconnects >= 1
    assert cli.error is None, cli.error
    assert cli.steps == [1, 2, 3, 4, 5, 6, 7], cli.steps
    assert shown_before == ([1, 2, 3], [1, 2, 3]), shown_before
    assert not cli.thread.is_alive()
