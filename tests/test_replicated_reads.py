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

from deepe_tasks import submit
from deepe_tasks.core import jobstore, keys
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.errors import NotReplicated
from deepe_tasks.core.events import read_events
from deepe_tasks.core.records import Event, EventKind
from deepe_tasks.core.settings import get_settings
from tests.helpers import TRL_SNIPPET, wait_for, write_method
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
        # closed by the primary, so that no byte of them reaches it), and two more followers
        # start, then the primary dies
        topo.pause(replica)
        topo.client(old).client_kill_filter(_type="replica")
        append(topo.client(old), [4, 5, 6])
        late_sse, late_cli = Follower(api, JOB), CliFollower()
        time.sleep(3)  # longer than a WAIT's DEEPE_REDIS_REPLICATION_TIMEOUT (2 s)
        shown_before = (sse_steps(sse), list(cli.steps), sse_steps(late_sse), list(late_cli.steps))
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
        for thread in (sse.thread, cli.thread, late_sse.thread, late_cli.thread):
            thread.join(timeout=60)

    # Then each follower shows every step once, in order
    for follower in (sse, late_sse):
        assert sse_steps(follower) == [1, 2, 3, 4, 5, 6, 7], sse_steps(follower)
        assert follower.events[-1]["kind"] == "succeeded"
    assert sse.reconnects >= 1
    for reader in (cli, late_cli):
        assert reader.error is None, reader.error
        assert reader.steps == [1, 2, 3, 4, 5, 6, 7], reader.steps
    # And none showed 4-6 while no replica had them: the followers that started then showed
    # nothing at all (WAIT covers all the primary wrote, not one job's events)
    assert shown_before == ([1, 2, 3], [1, 2, 3], [], []), shown_before


@pytest.mark.e2e
def test_a_primary_that_refuses_writes_for_want_of_replicas_holds_followers_back_and_refuses_submits(
        topo: Topology, tmp_path: Path, store: Path, sft_params: dict[str, Any]) -> None:
    # Given a primary set to refuse writes while no replica is in sync (min-replicas-to-write,
    # as docs/operations.md advises), a job's stream with steps 1-3, and two followers
    primary = topo.primary_port()
    [replica] = [p for p in topo.server_ports() if p != primary]
    admin = topo.client(primary)
    admin.config_set("min-replicas-to-write", 1)
    admin.config_set("min-replicas-max-lag", 1)
    client = get_redis()
    client.hset(keys.job(JOB), mapping={"status": "running", "attempts": 1})
    append(client, [1, 2, 3])
    with running_api(tmp_path / "api.log") as api:
        sse, cli = Follower(api, JOB), CliFollower()
        wait_for(lambda: sse_steps(sse) == [1, 2, 3] and cli.steps == [1, 2, 3], timeout=30)

        # When the replica stops: steps 4-5 are taken before the primary notices, then it
        # refuses every write (NOREPLICAS), a follower's barrier included
        topo.pause(replica)
        append(client, [4, 5])

        def refusing() -> bool:
            try:
                admin.set("deepe-test:probe", 1)
            except redis.ResponseError as e:
                return str(e).startswith("NOREPLICAS")
            return False

        wait_for(refusing, timeout=30, interval=0.2)
        time.sleep(3)  # the followers try again meanwhile
        shown = (sse_steps(sse), list(cli.steps))

        # Then a barrier and a submit fail with NotReplicated, which names the fix
        with pytest.raises(NotReplicated, match="replicas"):
            jobstore.barrier(client, JOB)
        method = write_method(store, "norep", TRL_SNIPPET)
        with pytest.raises(NotReplicated):
            submit(method, {**sft_params, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"},
                   queue="norep")

        # And once the replica is back, the followers show 4-5 and the end, having waited
        topo.resume(replica)
        wait_for(lambda: not refusing(), timeout=30, interval=0.2)
        final = Event(kind=EventKind.SUCCEEDED, job=JOB, attempt=1, message="succeeded")
        client.xadd(keys.events(JOB), {"data": final.to_json()})
        client.hset(keys.job(JOB), "status", "succeeded")
        for thread in (sse.thread, cli.thread):
            thread.join(timeout=60)
    assert shown == ([1, 2, 3], [1, 2, 3]), shown
    assert cli.error is None, cli.error
    assert cli.steps == [1, 2, 3, 4, 5], cli.steps
    assert sse_steps(sse) == [1, 2, 3, 4, 5] and sse.events[-1]["kind"] == "succeeded", sse.events
    assert not cli.thread.is_alive()
