"""DEEPE_MLFLOW_LOG_MODEL=true with the model on an object store (a real S3 endpoint, moto's
server) and a real `mlflow server`: the run's artifacts are the published model's files, read
from the store where its deepe.json says they are."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import JobStatus, submit
from deepe_tasks.core.objects import ObjectStore
from deepe_tasks.core.settings import get_settings
from tests.helpers import Worker
from tests.mlflow_server import MlflowServer, client, ended_run
from tests.s3 import MotoServer, moto_with_bucket

pytestmark = pytest.mark.e2e

BUCKET = "deepe-mlflow"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    s = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_with_bucket(tmp_path_factory.mktemp("moto") / "moto.log", BUCKET) as server:
        yield server


@pytest.fixture
def on_store(moto: MotoServer, tiny_model: Path, colors_data: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[ObjectStore]:
    """A store with the tiny base model and the dataset on it, this process (the submitter) on it."""
    url = f"s3://{BUCKET}/deepe-{uuid.uuid4().hex[:6]}"
    store = ObjectStore(url)
    store.put_tree(tiny_model, "base/tiny-llama")
    store.put_file(colors_data, "data/colors.jsonl")
    monkeypatch.setenv("DEEPE_STORAGE", url)
    get_settings.cache_clear()
    yield store
    monkeypatch.undo()
    get_settings.cache_clear()


def test_log_model_on_an_object_store_logs_the_published_adapter_files_as_the_runs_artifacts(
        workers: list[Worker], tmp_path: Path, server: MlflowServer, moto: MotoServer,
        on_store: ObjectStore) -> None:
    # Given a worker whose storage is the object store (no shared folder), with DEEPE_MLFLOW_LOG_MODEL=true
    workers.append(Worker("mlflow-s3", tmp_path / "w.log", env={
        **moto.env, "DEEPE_STORAGE": on_store.url, "DEEPE_CACHE_DIR": str(tmp_path / "disk"),
        "DEEPE_MLFLOW_URI": server.uri, "DEEPE_MLFLOW_EXPERIMENT": "deepe-tests",
        "DEEPE_MLFLOW_LOG_MODEL": "true"}).start())
    params: dict[str, Any] = {"MODEL_PATH": "base/tiny-llama", "DATASET_PATH": "data/colors.jsonl", "MAX_STEPS": 3,
                              "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "LEARNING_RATE": 5e-3}
    job = submit("sft-demo", params, queue="mlflow-s3")
    assert job.wait(timeout=240) is JobStatus.SUCCEEDED, job.info()["error"]
    output = job.info()["output_dir"]
    assert output.startswith("s3://")
    # When the tracker ends the job's run
    run = ended_run(server, job)
    # Then its artifacts under model/ are the published model's files (the ones deepe.json names) and deepe.json
    rel = on_store.rel_of(output)
    assert rel is not None
    manifest = on_store.read_json(f"{rel}/deepe.json")
    assert manifest is not None and manifest["job"] == job.id
    published = set(on_store.files(f"{rel}/{manifest['files']}"))
    logged = {Path(a.path).name for a in client(server).list_artifacts(run.info.run_id, "model")}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= published
    assert logged == published | {"deepe.json"}, (logged, published)
    # with the bytes of the store's copy
    got = Path(client(server).download_artifacts(run.info.run_id, "model/adapter_model.safetensors", str(tmp_path)))
    assert got.read_bytes() == on_store.read_bytes(f"{rel}/{manifest['files']}/adapter_model.safetensors")
    assert run.data.tags["deepe.model"] == output
