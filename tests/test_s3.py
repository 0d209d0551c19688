"""Object storage, against a real S3 HTTP endpoint (moto's standalone server): workers that share
no folder, checkpoints and models on the store, one model per OUTPUT_DIR whatever Redis says,
and the store's faults refused or retried with clear errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import EventKind, JobStatus, merge, submit
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.objects import ObjectStore
from deepe_tasks.core.settings import get_settings
from tests.helpers import SLOW_METHOD, Worker, wait_for, write_method
from tests.s3 import MotoServer, moto_with_bucket

BUCKET = "deepe-test"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_with_bucket(tmp_path_factory.mktemp("moto") / "moto.log", BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def bucket_url(moto: MotoServer, tiny_model: Path, colors_data: Path) -> str:
    """A store with the tiny base model and the dataset uploaded (what a user does first)."""
    url = f"s3://{BUCKET}/deepe-{uuid.uuid4().hex[:6]}"
    store = ObjectStore(url)
    store.put_tree(tiny_model, "base/tiny-llama")
    store.put_file(colors_data, "data/colors.jsonl")
    return url


@pytest.fixture
def on_store(bucket_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ObjectStore]:
    """This process (the submitter) on the store, as its workers are."""
    monkeypatch.setenv("DEEPE_STORAGE", bucket_url)
    get_settings.cache_clear()
    yield ObjectStore(bucket_url)
    monkeypatch.undo()
    get_settings.cache_clear()


def worker_on_store(workers: list[Worker], queue: str, disk: Path, moto: MotoServer, url: str,
                    **env: str) -> Worker:
    """A worker with a local disk of its own (DEEPE_CACHE_DIR) and no shared folder."""
    w = Worker(queue, disk.with_suffix(".log"), env={
        **moto.env, "DEEPE_STORAGE": url, "DEEPE_CACHE_DIR": str(disk), "DEEPE_LEASE_TTL": "3",
        "DEEPE_CHECKPOINT_MINUTES": "0.02", **env}).start()
    workers.append(w)
    return w


def params(url: str, **more: Any) -> dict[str, Any]:
    # One path relative to the store, one as its URL: both are accepted.
    return {"MODEL_PATH": "base/tiny-llama", "DATASET_PATH": f"{url}/data/colors.jsonl", "MAX_STEPS": 4,
            "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "LEARNING_RATE": 5e-3,
            "PromptInputColumn": "instruction", "PromptOutputColumn": "output", **more}


def published(store: ObjectStore, output_url: str) -> tuple[dict[str, Any], set[str]]:
    """The manifest at OUTPUT_DIR, and the files of the model it names."""
    rel = store.rel_of(output_url)
    assert rel is not None, output_url
    manifest = store.read_json(f"{rel}/deepe.json")
    assert manifest is not None, f"no deepe.json at {output_url}"
    return manifest, set(store.files(f"{rel}/{manifest['files']}"))


@pytest.mark.e2e
def test_a_job_killed_on_one_worker_resumes_on_another_from_the_store_and_publishes_there(
        workers: list[Worker], tmp_path: Path, store: Path, moto: MotoServer, bucket_url: str,
        on_store: ObjectStore) -> None:
    slow = write_method(store, "s3_slow", SLOW_METHOD)
    # Given two workers that share no folder (each its own disk), the first one alone at first
    first = worker_on_store(workers, "s3-q", tmp_path / "disk-a", moto, bucket_url)
    job = submit(slow, params(bucket_url, MAX_STEPS=16, step_sleep=0.4), queue="s3-q")
    assert job.record().output_dir == f"{bucket_url}/models/{job.id}"  # the record keeps URLs
    assert job.record().params["MODEL_PATH"] == f"{bucket_url}/base/tiny-llama"
    # When it is SIGKILLed once a checkpoint has reached the store
    checkpoints = f"jobs/{job.id}/attempts/1/checkpoints/checkpoint-*/deepe-checkpoint.json"
    wait_for(lambda: on_store.glob(checkpoints) or job.status().is_final, timeout=180)
    assert job.status() is JobStatus.RUNNING, job.info()
    first.process.signal(signal.SIGKILL, group=True)
    # Then the second worker, whose disk holds nothing of the job, resumes it from the store
    worker_on_store(workers, "s3-q", tmp_path / "disk-b", moto, bucket_url)
    assert job.wait(timeout=240) is JobStatus.SUCCEEDED, job.info()
    assert job.info()["attempts"] == 2
    resumed = [e for e in job.events() if e.kind is EventKind.RESUMED]
    assert resumed and resumed[0].attempt == 2 and (resumed[0].step or 0) > 0
    # and the model is on the store: deepe.json written last names the attempt's files
    assert job.info()["output_dir"] == f"{bucket_url}/models/{job.id}"
    manifest, files = published(on_store, job.info()["output_dir"])
    assert manifest["job"] == job.id and manifest["attempt"] == 2 and manifest["steps"] == 16
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    # with nothing else of the job beside it, and its checkpoints gone (DEEPE_KEEP_CHECKPOINTS)
    assert sorted(on_store.glob(f"models/{job.id}/*")) == sorted([f"models/{job.id}/deepe.json",
                                                                  f"models/{job.id}/{manifest['files']}"])
    wait_for(lambda: not on_store.glob(f"jobs/{job.id}/attempts/*/checkpoints/*"), timeout=30)  # just after its end
    # and each attempt's events and log reached the store
    events = (on_store.read_bytes(f"jobs/{job.id}/attempts/2/events.jsonl") or b"").decode()
    assert '"kind": "resumed"' in events or '"kind":"resumed"' in events, events[-1000:]
    # (the second worker fetched the base model: its disk had none of it)
    stored_log = (on_store.read_bytes(f"jobs/{job.id}/attempts/2/output.log") or b"").decode()
    assert f"MODEL_PATH={bucket_url}/base/tiny-llama: fetched" in stored_log, stored_log[-2000:]

    # And a second job on the same base model on that worker reads it from its cache
    again = submit(slow, params(bucket_url, MAX_STEPS=2, step_sleep=0), queue="s3-q")
    assert again.wait(timeout=180) is JobStatus.SUCCEEDED, again.info()
    log = (tmp_path / "disk-b" / "mirror").glob(f"*/jobs/{again.id}/output.log")
    text = next(log).read_text()
    assert f"MODEL_PATH={bucket_url}/base/tiny-llama: from the worker's cache" in text, text[-2000:]

    # And a merge reads the adapter and base from the store and publishes the merged model there
    merged = merge(job.id, queue="s3-q")
    assert merged.wait(timeout=180) is JobStatus.SUCCEEDED, merged.info()
    assert merged.info()["output_dir"] == f"{bucket_url}/models/{job.id}-merged"
    manifest, files = published(on_store, merged.info()["output_dir"])
    assert manifest["merged_from"] == job.id and "config.json" in files
    assert any(name.endswith(".safetensors") for name in files)


def _spec(url: str, root: Path, claim: str, attempt: int) -> Any:
    from deepe_tasks.core.records import JobSpec

    return JobSpec(job_id="race", method="m", method_sha256="0" * 64, source="", storage_root=str(root),
                   params={"OUTPUT_DIR": f"{url}/models/race"}, attempt=attempt, claim=claim,
                   submitted_at=1.0, storage_url=url, cache_dir=str(root / "cache"))


def test_two_stale_attempts_racing_to_publish_one_output_dir_give_exactly_one_model(
        tmp_path: Path, moto: MotoServer, bucket_url: str) -> None:
    from deepe_tasks.core.fences import AlreadyPublished
    from deepe_tasks.job.remote import Remote

    # Given eight attempts of one job (Redis handed it out again and again), each with a staged model
    attempts = []
    for n in range(1, 9):
        remote = Remote(_spec(bucket_url, tmp_path / f"w{n}", f"w{n}:1:{n}", n))
        remote.localize()
        staging = tmp_path / f"staged-{n}"
        staging.mkdir()
        (staging / "adapter_model.safetensors").write_bytes(bytes([n]) * 4096)
        (staging / "deepe.json").write_text(json.dumps({"job": "race", "attempt": n, "claim": f"w{n}:1:{n}",
                                                        "submitted_at": 1.0}))
        attempts.append((remote, staging))
    outcomes: dict[int, str] = {}
    barrier = threading.Barrier(len(attempts))

    def publish(n: int, remote: Any, staging: Path) -> None:
        barrier.wait()
        try:
            remote.publish(staging, what="model", fix="")
            outcomes[n] = "published"
        except AlreadyPublished:
            outcomes[n] = "adopted"

    # When all of them publish at once
    threads = [threading.Thread(target=publish, args=(n, r, s)) for n, (r, s) in enumerate(attempts, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then exactly one published; the others adopt its model; only its files stay
    assert sorted(outcomes.values()) == ["adopted"] * 7 + ["published"]
    store = ObjectStore(bucket_url)
    manifest, files = published(store, f"{bucket_url}/models/race")
    winner = next(n for n, o in outcomes.items() if o == "published")
    assert manifest["attempt"] == winner and files == {"adapter_model.safetensors"}
    assert store.read_bytes(f"models/race/{manifest['files']}/adapter_model.safetensors") == bytes([winner]) * 4096
    assert sorted(store.glob("models/race/*")) == sorted(["models/race/deepe.json", f"models/race/{manifest['files']}"])


def test_a_store_that_is_missing_or_an_input_that_is_not_there_is_refused_at_submit(
        moto: MotoServer, bucket_url: str, sft_params: dict[str, object], monkeypatch: pytest.MonkeyPatch,
        store: Path) -> None:
    method = write_method(store, "s3_refused", SLOW_METHOD)
    try:
        monkeypatch.setenv("DEEPE_STORAGE", "s3://no-such-bucket-here/x")
        get_settings.cache_clear()
        with pytest.raises(InvalidParams, match="bucket 'no-such-bucket-here' .the bucket does not exist.*Create the bucket"):
            submit(method, params(bucket_url))
        monkeypatch.setenv("DEEPE_STORAGE", bucket_url)
        get_settings.cache_clear()
        with pytest.raises(InvalidParams, match="MODEL_PATH='base/nothing-here' resolves to .*no config.json"):
            submit(method, params(bucket_url, MODEL_PATH="base/nothing-here"))
        with pytest.raises(InvalidParams, match="outside DEEPE_STORAGE"):
            submit(method, params(bucket_url, DATASET_PATH="s3://another-bucket/data.jsonl"))
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


@pytest.mark.e2e
def test_a_worker_refuses_to_start_on_a_bucket_that_does_not_exist(moto: MotoServer, tmp_path: Path) -> None:
    env = {**moto.env, "DEEPE_STORAGE": "s3://no-such-bucket-here/x", "DEEPE_CACHE_DIR": str(tmp_path)}
    import os

    done = subprocess.run([sys.executable, "-m", "deepe_tasks", "worker", "--queues", "never"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "bucket 'no-such-bucket-here' (the bucket does not exist)" in done.stderr
    assert moto.env["AWS_SECRET_ACCESS_KEY"] not in done.stderr + done.stdout


@pytest.mark.e2e
def test_an_upload_cut_during_the_publish_is_retried_and_one_that_never_gets_through_publishes_nothing(
        workers: list[Worker], tmp_path: Path, moto: MotoServer, bucket_url: str, on_store: ObjectStore,
        store: Path) -> None:
    from tests.faultproxy import FaultProxy

    method = write_method(store, "s3_faults", SLOW_METHOD)
    # Given workers that reach the store through a proxy that cuts every connection, for a
    # while, when the model's files are uploaded to OUTPUT_DIR (under the attempt's key, a1-…)
    # (each operation is tried for 5 s: DEEPE_STORAGE_RETRY_SECONDS)
    for blackout, queue in ((2.0, "s3-blip"), (12.0, "s3-down")):
        with FaultProxy(moto.port, trigger=b"/a1-", blackout=blackout) as proxy:
            endpoint = f"http://127.0.0.1:{proxy.port}"
            worker_on_store(workers, queue, tmp_path / f"disk-{queue}", moto, bucket_url,
                            AWS_ENDPOINT_URL_S3=endpoint, AWS_ENDPOINT_URL=endpoint,
                            DEEPE_STORAGE_RETRY_SECONDS="5")
            job = submit(method, params(bucket_url, MAX_STEPS=2, step_sleep=0), queue=queue)
            status = job.wait(timeout=240)
            assert proxy.fired_at, "the proxy never saw the upload"
        manifest = on_store.read_json(f"models/{job.id}/deepe.json")
        if blackout < 5:
            # Then a short cut is retried and the model is published whole
            assert status is JobStatus.SUCCEEDED, job.info()
            assert manifest is not None and manifest["job"] == job.id
        else:
            # And one that outlasts every retry fails the job, naming the store, with no model
            assert status is JobStatus.FAILED
            error = job.info()["error"]
            assert "failed after" in error and "DEEPE_STORAGE_RETRY_SECONDS" in error, error
            assert f"models/{job.id}/a1-" in error, error
            assert manifest is None


@pytest.mark.e2e
def test_a_preempted_job_resumes_on_another_disk_from_its_last_checkpoint_and_cancel_save_publishes_there(
        workers: list[Worker], tmp_path: Path, store: Path, moto: MotoServer, bucket_url: str,
        on_store: ObjectStore) -> None:
    slow = write_method(store, "s3_preempt", SLOW_METHOD)
    # Given a job training on a worker whose checkpoints come only when it stops (60 minutes apart)
    first = worker_on_store(workers, "s3-pre", tmp_path / "disk-a", moto, bucket_url, DEEPE_CHECKPOINT_MINUTES="60")
    job = submit(slow, params(bucket_url, MAX_STEPS=40, step_sleep=0.3), queue="s3-pre")
    wait_for(lambda: (p := job.progress()) is not None and (p.step or 0) >= 3, timeout=180)
    # When that worker is told to stop (SIGTERM: a spot notice, a scale-in)
    first.process.signal(signal.SIGTERM)
    assert first.process.proc is not None and first.process.proc.wait(timeout=120) == 0
    # Then the checkpoint it took on the way out is on the store before the job is queued again
    assert job.status() is JobStatus.QUEUED, job.info()
    stopped_at = [int(p.rsplit("-", 1)[1]) for p in on_store.glob(f"jobs/{job.id}/attempts/1/checkpoints/checkpoint-*")]
    assert stopped_at and stopped_at[0] >= 3
    # and a worker on another disk resumes from it
    worker_on_store(workers, "s3-pre", tmp_path / "disk-b", moto, bucket_url, DEEPE_CHECKPOINT_MINUTES="60")
    wait_for(lambda: any(e.kind is EventKind.RESUMED for e in job.events()) or job.status().is_final, timeout=180)
    resumed = [e for e in job.events() if e.kind is EventKind.RESUMED]
    assert resumed and resumed[0].step == stopped_at[0], [e.kind.value for e in job.events()]
    # And a cancel with save publishes the partial model on the store, marked so
    wait_for(lambda: (p := job.progress()) is not None and p.attempt == 2 and (p.step or 0) > stopped_at[0] + 1,
             timeout=120)
    job.cancel(save=True)
    assert job.wait(timeout=120) is JobStatus.CANCELLED, job.info()
    manifest, files = published(on_store, job.info()["output_dir"])
    assert manifest["partial"] is True and stopped_at[0] < manifest["steps"] < 40
    assert "adapter_model.safetensors" in files


@pytest.mark.e2e
def test_a_failed_checkpoint_upload_costs_only_itself_and_the_time_limit_keeps_the_last_one_on_the_store(
        workers: list[Worker], tmp_path: Path, moto: MotoServer, bucket_url: str, on_store: ObjectStore,
        store: Path) -> None:
    from tests.faultproxy import FaultProxy

    slow = write_method(store, "s3_ckpt_faults", SLOW_METHOD)
    # Given a worker that reaches the store through a proxy that cuts every connection for 12 s
    # at the first checkpoint upload (each store call is tried for 4 s: this one fails)
    with FaultProxy(moto.port, trigger=b"/checkpoints/checkpoint-", blackout=12.0) as proxy:
        endpoint = f"http://127.0.0.1:{proxy.port}"
        worker_on_store(workers, "s3-ckpt", tmp_path / "disk", moto, bucket_url, AWS_ENDPOINT_URL_S3=endpoint,
                        AWS_ENDPOINT_URL=endpoint, DEEPE_STORAGE_RETRY_SECONDS="4", DEEPE_CHECKPOINT_MINUTES="0.05")
        # When a job with a time limit trains through the outage
        job = submit(slow, params(bucket_url, MAX_STEPS=400, step_sleep=0.3), queue="s3-ckpt", time_limit=30)
        # Then training went on while the upload failed (steps kept coming during the outage)
        wait_for(lambda: bool(proxy.fired_at) or job.status().is_final, timeout=120)
        assert proxy.fired_at, job.info()
        at_cut = max(first_losses_steps(job), default=0)
        wait_for(lambda: max(first_losses_steps(job), default=0) >= at_cut + 10 or job.status().is_final, timeout=60)
        assert max(first_losses_steps(job), default=0) >= at_cut + 10
        # and the time limit stops it, failed, with its last checkpoint on the store
        assert job.wait(timeout=120) is JobStatus.FAILED, job.info()
    assert "time limit of 30 s reached" in job.info()["error"]
    markers = on_store.glob(f"jobs/{job.id}/attempts/1/checkpoints/checkpoint-*/deepe-checkpoint.json")
    steps = sorted(int(m.split("/")[-2].rsplit("-", 1)[1]) for m in markers)
    last = [e.step for e in job.events() if e.kind is EventKind.CHECKPOINT][-1]
    assert steps and steps[-1] == last, (steps, last)
    assert on_store.read_json(f"models/{job.id}/deepe.json") is None  # a failed job publishes nothing
    log = next((tmp_path / "disk" / "mirror").glob(f"*/jobs/{job.id}/output.log")).read_text()
    assert "could not be uploaded" in log and "DEEPE_STORAGE_RETRY_SECONDS" in log, log[-3000:]


def first_losses_steps(job: Any) -> list[int]:
    return [e.step for e in job.events() if e.kind is EventKind.LOG and e.step is not None]


@pytest.mark.e2e
def test_an_lm_eval_task_on_the_store_is_fetched_by_a_worker_that_shares_no_folder(
        workers: list[Worker], tmp_path: Path, moto: MotoServer, bucket_url: str, on_store: ObjectStore) -> None:
    from deepe_tasks import evaluate
    from deepe_tasks.fixtures import tiny
    from deepe_tasks.queue.evals import results
    from tests.test_lmeval import ROWS, TASK

    # Given a task file and its data uploaded to the store, and a worker whose disk has neither
    folder = tmp_path / "task"
    tiny.write_jsonl(ROWS, folder / "colors_mc.jsonl")
    (folder / "task.yaml").write_text(TASK)
    on_store.put_tree(folder, "lmeval/colors")
    worker_on_store(workers, "s3-lme", tmp_path / "disk", moto, bucket_url)
    # When the base model is evaluated on it, the worker fetches the task's folder and scores every row
    job = evaluate(f"{bucket_url}/base/tiny-llama", lm_eval="lmeval/colors/task.yaml", queue="s3-lme")
    assert job.record().params["LM_EVAL_DIR"] == f"{bucket_url}/lmeval/colors"  # the record keeps URLs
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    scored = results(job)["lm_eval"]["results"]["colors_mc"]
    assert 0 <= scored["acc"] <= 1 and scored["samples"] == len(ROWS)
    # And a task whose data file is not on the store is refused at submit, naming it
    on_store.put_file(folder / "task.yaml", "lmeval/bare/task.yaml")
    with pytest.raises(InvalidParams, match="colors_mc.jsonl"):
        evaluate(f"{bucket_url}/base/tiny-llama", lm_eval="lmeval/bare/task.yaml", queue="s3-lme")
