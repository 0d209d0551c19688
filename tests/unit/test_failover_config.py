"""Redis Sentinel settings and the storage-side fences, without a server (tests/test_failover.py
has the same guarantees against real sentinels, a primary and its replica)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepe_tasks.core import storage
from deepe_tasks.core.broker import make_app
from deepe_tasks.core.connection import connect, parse_sentinel
from deepe_tasks.core.errors import ConfigError
from deepe_tasks.core.fences import AlreadyPublished, mark_attempt, published_by_another
from deepe_tasks.core.settings import Settings, get_settings, safe_url
from deepe_tasks.worker.credentials import strip_auth

SENTINELS = "sentinel://:pw@10.0.0.1:26379/2;sentinel://:pw@10.0.0.2:26380/2;sentinel://:pw@10.0.0.3/2"


@pytest.fixture()
def sentinel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DEEPE_REDIS_URL", SENTINELS)
    monkeypatch.setenv("DEEPE_REDIS_SENTINEL_MASTER", "deepe")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_a_sentinel_url_is_read_as_kombu_reads_it() -> None:
    parsed = parse_sentinel(SENTINELS)
    assert parsed.hosts == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379)]
    assert (parsed.db, parsed.password) == (2, "pw")
    with pytest.raises(ConfigError, match="sentinel://host1:26379;"):
        parse_sentinel("sentinel://a:1;redis://b:2")
    # Celery reads the database and password of the part it connects through: all must agree
    with pytest.raises(ConfigError, match="the same user:password@ and /db in every sentinel:// part"):
        parse_sentinel("sentinel://:pw@a:1;sentinel://b:2/0")
    assert parse_sentinel("sentinel://a:1;sentinel://b:2;sentinel://c:3/0").db == 0  # the documented form


def test_replicas_are_asked_for_by_default_under_sentinel_only() -> None:
    assert Settings(redis_url="redis://h:6379/0").min_replicas == 0
    assert Settings(redis_url=SENTINELS, redis_sentinel_master="m").min_replicas == 1
    assert Settings(redis_url=SENTINELS, redis_sentinel_master="m", redis_min_replicas=0).min_replicas == 0


def test_a_sentinel_url_without_its_master_name_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPE_REDIS_URL", SENTINELS)
    monkeypatch.delenv("DEEPE_REDIS_SENTINEL_MASTER", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match="set DEEPE_REDIS_SENTINEL_MASTER"):
            connect(SENTINELS)
        with pytest.raises(ConfigError, match="set DEEPE_REDIS_SENTINEL_MASTER"):
            make_app(get_settings())
    finally:
        get_settings.cache_clear()


def test_every_client_and_celery_are_pointed_at_the_sentinels(sentinel_env: None) -> None:
    client = connect(SENTINELS, decode_responses=True, username="job-user", password="job-pw")
    pool = client.connection_pool
    assert pool.service_name == "deepe"  # type: ignore[attr-defined]
    assert [(c.connection_pool.connection_kwargs["host"]) for c in pool.sentinel_manager.sentinels] == [  # type: ignore[attr-defined]
        "10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert (pool.connection_kwargs["username"], pool.connection_kwargs["password"], pool.connection_kwargs["db"]) == (
        "job-user", "job-pw", 2)
    # A None credential (a job process on the worker's own) keeps the URL's password.
    assert connect(SENTINELS, password=None).connection_pool.connection_kwargs["password"] == "pw"
    conf = make_app(get_settings()).conf
    assert conf.broker_transport_options["master_name"] == "deepe"
    assert conf.result_backend_transport_options["master_name"] == "deepe"
    assert conf.broker_transport_options["queue_order_strategy"] == "priority"


def test_passwords_are_masked_and_stripped_in_each_sentinel_of_the_list() -> None:
    assert "pw" not in safe_url(SENTINELS) and safe_url(SENTINELS).count("sentinel://") == 3
    assert strip_auth(SENTINELS) == "sentinel://10.0.0.1:26379/2;sentinel://10.0.0.2:26380/2;sentinel://10.0.0.3/2"


def test_of_two_claims_of_one_attempt_number_exactly_one_owns_its_folder(tmp_path: Path) -> None:
    # Given two workers handed attempt 3 of a job by a Redis that lost the first claim
    folder = tmp_path / "jobs" / "j" / "attempts" / "3"
    results: dict[str, str | None] = {}
    barrier = threading.Barrier(2)

    def take(claim: str) -> None:
        barrier.wait()
        results[claim] = mark_attempt(folder, claim)

    threads = [threading.Thread(target=take, args=(c,)) for c in ("w1:1:aa", "w2:1:bb")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then one owns the folder and the other is told whose it is
    assert sorted(results.values(), key=str) == sorted([None, "w1:1:aa" if results["w2:1:bb"] else "w2:1:bb"], key=str)
    winner = next(c for c, other in results.items() if other is None)
    assert mark_attempt(folder, winner) is None  # the owner may mark it again (a retried hand-over)


def _publish(tmp_path: Path, target: Path, claim: str, submitted_at: float, weights: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".staging-{claim}"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(weights)
    (staging / storage.MANIFEST).write_text(json.dumps({"job": "j", "claim": claim, "submitted_at": submitted_at,
                                                        "attempt": 1}))
    storage.publish(staging, target, job_id="j", storage_root=tmp_path, claim=claim, submitted_at=submitted_at)


def test_a_model_published_by_one_claim_is_never_replaced_by_another_claim_of_the_job(tmp_path: Path) -> None:
    target = tmp_path / "models" / "out"
    _publish(tmp_path, target, "w1:1:aa", 100.0, b"first")
    # When a second claim of the same job (same submit time) publishes there
    with pytest.raises(AlreadyPublished, match="already published"):
        _publish(tmp_path, target, "w2:1:bb", 100.0, b"second")
    # Then the first model stands, and the second claim is told it may adopt it
    assert (target / "model.safetensors").read_bytes() == b"first"
    assert published_by_another(target, "j", 100.0, "w2:1:bb") is not None
    assert published_by_another(target, "j", 100.0, "w1:1:aa") is None  # its own
    # An earlier job of the same id (another submit time) is replaced, as before
    _publish(tmp_path, target, "w3:1:cc", 200.0, b"new job")
    assert (target / "model.safetensors").read_bytes() == b"new job"
