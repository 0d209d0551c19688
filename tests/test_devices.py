"""Multi-device jobs without training: routing, what workers own, and what submit refuses.

The jobs themselves train in tests/test_multi_gpu.py, on real 2-rank workers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import redis
from fastapi.testclient import TestClient

from deepe_tasks import submit
from deepe_tasks.core import devices, keys, validate
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.settings import get_settings
from tests.helpers import cli_here


@pytest.fixture
def no_workers(r: redis.Redis) -> Iterator[None]:
    """deepe:workers as a test sets it, and as it was afterwards."""
    saved: Any = r.hgetall(keys.WORKERS)
    r.delete(keys.WORKERS)
    yield
    r.delete(keys.WORKERS)
    if saved:
        r.hset(keys.WORKERS, mapping=saved)


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_a_job_of_n_devices_goes_to_its_own_queue_and_workers_take_the_largest_first() -> None:
    assert devices.route("gpu", 1) == "gpu"
    assert devices.route("a100", 4) == "a100.4gpus"
    assert devices.consumed(["gpu"], 1) == ["gpu"]
    assert devices.consumed(["a100", "gpu"], 3) == ["a100.3gpus", "a100.2gpus", "a100", "gpu.3gpus", "gpu.2gpus",
                                                    "gpu"]


def test_what_a_worker_owns() -> None:
    assert devices.device_list(None) == ["0"]
    assert devices.device_list("0, 1,2,3") == ["0", "1", "2", "3"]
    for bad in ("", "0,0", "a,b", "0;1", ",".join(str(i) for i in range(65))):
        with pytest.raises(InvalidParams, match="DEEPE_GPUS"):
            devices.device_list(bad)


@pytest.mark.parametrize("value", [0, -1, 65, 1.5, "2", True, None])
def test_gpus_must_be_a_whole_number_of_devices(value: Any) -> None:
    with pytest.raises(InvalidParams, match=r"gpus=.* is not valid; allowed: a whole number of devices from 1 to 64"):
        validate.gpus(value)


def test_a_queue_may_not_be_named_like_a_multi_device_queue() -> None:
    with pytest.raises(InvalidParams, match="submit with gpus=N"):
        validate.queue_name("gpu.2gpus")
    assert validate.queue_name("gpus2") == "gpus2"


def test_the_largest_worker_up_now_and_stale_entries_dropped(r: redis.Redis, no_workers: None) -> None:
    assert devices.largest(r, stale_after=90) is None
    devices.register(r, "small@h", 1, ["gpu"])
    devices.register(r, "large@h", 4, ["a100", "gpu"])
    r.hset(keys.WORKERS, "gone@h", f"8 {time.time() - 600:.0f} gpu")  # a worker last seen ten minutes ago
    r.hset(keys.WORKERS, "junk", "not a count")
    assert devices.largest(r, stale_after=90) == (4, "large@h")
    assert set(r.hkeys(keys.WORKERS)) == {"small@h", "large@h"}
    # Per queue: only the workers that take that queue's jobs count
    devices.register(r, "other@h", 8, ["h100"])
    assert devices.largest(r, stale_after=90, queue="gpu") == (4, "large@h")
    assert devices.largest(r, stale_after=90, queue="h100") == (8, "other@h")
    assert devices.largest(r, stale_after=90, queue="tpu") is None
    assert [w for w, *_ in devices.live(r, stale_after=90)] == ["large@h", "other@h", "small@h"]
    devices.unregister(r, "large@h")
    assert devices.largest(r, stale_after=90, queue="gpu") == (1, "small@h")
    assert devices.unroute("gpu.4gpus") == ("gpu", 4) and devices.unroute("gpu") == ("gpu", 1)


def test_submit_refuses_a_job_larger_than_any_worker_and_queues_one_that_fits(
        r: redis.Redis, no_workers: None, sft_params: dict[str, object]) -> None:
    # Given workers of one and two devices
    devices.register(r, "small@h", 1, ["sizes"])
    devices.register(r, "pair@h", 2, ["sizes"])
    devices.register(r, "big@h", 8, ["elsewhere"])  # a larger worker, of another queue: it cannot run them
    # When a job asks for three, it is refused, naming the largest worker and the ways out
    with pytest.raises(InvalidParams) as refused:
        submit("sft-demo", sft_params, queue="sizes", gpus=3)
    message = str(refused.value)
    assert "asks for 3 devices (gpus=3)" in message and "pair@h" in message and "owns 2" in message
    assert "of queue 'sizes'" in message and "big@h" not in message
    assert "deepe worker --queues sizes --gpus 0,1,2" in message and "DEEPE_MAX_JOB_GPUS=3" in message
    # And one that fits is queued on the 2-device queue, in priority order, with its size shown
    job = submit("sft-demo", sft_params, queue="sizes", gpus=2)
    record = job.record()
    assert (record.gpus, record.route) == (2, "sizes.2gpus")
    assert r.llen("sizes.2gpus:5") == 1 and r.llen("sizes:5") == 0
    assert "sizes.2gpus" in r.smembers(keys.QUEUES)
    assert any(e.message.endswith("queued on sizes for 2 devices (sizes.2gpus)") for e in job.events())
    job.cancel()


def test_with_no_worker_up_any_size_is_queued_and_max_job_gpus_bounds_it(
        r: redis.Redis, no_workers: None, fresh_settings: None, sft_params: dict[str, object],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A fleet that starts workers on demand (KEDA) has none up when a job arrives
    job = submit("sft-demo", sft_params, queue="sizes", gpus=8)
    assert job.record().route == "sizes.8gpus"
    job.cancel()
    monkeypatch.setenv("DEEPE_MAX_JOB_GPUS", "4")
    get_settings.cache_clear()
    devices.register(r, "pair@h", 2, ["sizes"])  # the bound is the setting's, not the workers up now
    submit("sft-demo", sft_params, queue="sizes", gpus=4).cancel()
    with pytest.raises(InvalidParams, match="DEEPE_MAX_JOB_GPUS=4 is the most any worker of this cluster owns"):
        submit("sft-demo", sft_params, queue="sizes", gpus=5)


def test_the_cli_and_the_api_take_gpus(r: redis.Redis, no_workers: None, http: TestClient,
                                       sft_params: dict[str, object]) -> None:
    devices.register(r, "pair@h", 2, ["sizes", "gpu"])
    params = [f"-p{k}={v}" for k, v in sft_params.items()]
    bad = cli_here("submit", "sft-demo", *params, "--gpus", "0")
    assert bad.returncode == 2 and "gpus=0 is not valid" in bad.stderr
    big = cli_here("submit", "sft-demo", *params, "--gpus", "3", "--queue", "sizes")
    assert big.returncode == 2 and "asks for 3 devices" in big.stderr
    ok = cli_here("submit", "sft-demo", *params, "--gpus", "2", "--queue", "sizes", "--json")
    assert ok.returncode == 0, ok.stderr
    refused = http.post("/jobs", json={"method": "sft-demo", "params": sft_params, "queue": "sizes", "gpus": 3})
    assert refused.status_code == 422 and "asks for 3 devices" in refused.json()["detail"]
    accepted = http.post("/jobs", json={"method": "sft-demo", "params": sft_params, "queue": "sizes", "gpus": 2})
    assert accepted.status_code == 201
    shown = http.get(f"/jobs/{accepted.json()['id']}").json()
    assert (shown["gpus"], shown["route"]) == (2, "sizes.2gpus")
    http.post(f"/jobs/{accepted.json()['id']}/cancel")


def test_deepe_worker_consumes_every_size_it_can_run(fresh_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPE_GPUS", "0")  # restored (unset) after the test, whatever `deepe worker` sets
    with mock.patch("deepe_tasks.core.broker.app.worker_main") as main:
        assert cli_here("worker", "--queues", "a100,gpu", "--gpus", "0,1,2").returncode == 0
    argv = main.call_args.args[0]
    assert argv[argv.index("-Q") + 1] == "a100.3gpus,a100.2gpus,a100,gpu.3gpus,gpu.2gpus,gpu"
    with mock.patch("deepe_tasks.core.broker.app.worker_main") as main:
        refused = cli_here("worker", "--gpus", "0,0")
    assert refused.returncode == 2 and "not a list of distinct device indexes" in refused.stderr
    main.assert_not_called()


def test_a_queue_without_a_worker_for_its_size_shows_its_waiting_jobs(
        r: redis.Redis, no_workers: None, sft_params: dict[str, object]) -> None:
    from deepe_tasks.queue.queues import overview

    job = submit("sft-demo", sft_params, queue="lonely", gpus=4)
    infos = {i.name: i for i in overview(r, {})}
    assert infos["lonely.4gpus"].gpus == 4 and infos["lonely.4gpus"].workers == []
    assert job.id in [w["id"] for w in infos["lonely.4gpus"].waiting]
    job.cancel()


def test_a_worker_takes_the_size_from_the_message_and_reads_the_record_only_for_one_without_it(
        r: redis.Redis, fresh_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.exceptions import Reject

    from deepe_tasks.worker import claiming

    monkeypatch.setenv("DEEPE_GPUS", "0,1")
    monkeypatch.setattr(claiming, "MISROUTED_BACKOFF", 0)
    job_id = f"size-{time.time_ns()}"
    r.hset(keys.job(job_id), "gpus", "2")
    try:
        with mock.patch.object(redis.Redis, "hget", wraps=r.hget) as hget:
            assert claiming.world_size(job_id, "w@h", 2) == 2
            assert hget.call_count == 0  # the message said: no round trip before the job starts
            assert claiming.world_size(job_id, "w@h", None) == 2  # a message without it: the record says
            assert hget.call_count == 1
        r.hset(keys.job(job_id), "gpus", "4")
        with pytest.raises(Reject, match="needs 4 devices; this worker owns 2"):
            claiming.world_size(job_id, "w@h", None)
        with pytest.raises(Reject, match="needs 3 devices"):
            claiming.world_size(job_id, "w@h", 3)
    finally:
        r.delete(keys.job(job_id))
