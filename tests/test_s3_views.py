"""What readers show of a published model (`deepe status`, GET /jobs/{id}, the job page), on a
folder and on an object store (moto's standalone server), and `deepe run-local` on a store.

A model exists when and only when its deepe.json does; on a store its files are under the key
deepe.json names, and nothing else under OUTPUT_DIR is shown as the model."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from deepe_tasks import JobStatus, submit
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.objects import ObjectStore
from deepe_tasks.core.settings import get_settings
from tests.helpers import Worker, cli_here
from tests.s3 import MotoServer
from tests.test_s3 import bucket_url, moto, on_store, params, worker_on_store  # noqa: F401 (fixtures)
from tests.test_ui import api_url, browser, sign_in  # noqa: F401 (fixtures)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def folder_job(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, colors_data: Path) -> Iterator[str]:
    """A job that published its model on the folder storage, through a real worker."""
    worker = Worker("views-f", tmp_path_factory.mktemp("views") / "worker.log").start()
    try:
        job = submit("sft-demo", {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(colors_data), "MAX_STEPS": 2,
                                  "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4}, queue="views-f")
        assert job.wait(timeout=240) is JobStatus.SUCCEEDED, job.info()
        yield job.id
    finally:
        worker.stop()


def on_disk(folder: Path) -> dict[str, int]:
    """The model's files on a folder, deepe.json aside: name and size."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*")
            if p.is_file() and p.name != "deepe.json"}


def shown(model: dict[str, Any]) -> dict[str, int]:
    return {f["name"]: f["size"] for f in model["files"]}


def test_status_and_the_api_show_the_files_of_a_model_on_a_folder_and_say_when_there_is_none(
        folder_job: str, http: TestClient) -> None:
    from deepe_tasks.ui.display import fmt_bytes

    # Given a job that published its model on the folder
    status = json.loads(cli_here("status", folder_job, "--json").stdout)
    folder = Path(status["output_dir"])
    files = on_disk(folder)
    assert "adapter_model.safetensors" in files and "tokenizer.json" in files
    # Then `deepe status --json` and GET /jobs/{id} list its files, sizes and total
    for model in (status["model"], http.get(f"/jobs/{folder_job}").json()["model"]):
        assert model["published"] is True and model["url"] == str(folder)
        assert shown(model) == files and model["total_bytes"] == sum(files.values())
    # and `deepe status` prints each file with its size, and the total
    text = cli_here("status", folder_job)
    assert text.returncode == 0, text.stderr
    rows = [line.replace("│", " ").split() for line in text.stdout.splitlines()]
    assert ["adapter_model.safetensors", *fmt_bytes(files["adapter_model.safetensors"]).split()] in rows, text.stdout
    assert [str(len(files)), "files", *fmt_bytes(sum(files.values())).split()] in rows, text.stdout
    # (the job list looks for no files: one listing per request, for one job)
    listed = http.get("/jobs", params={"limit": 50}).json()["jobs"]
    assert all(j["model"] is None for j in listed)

    # And a job with no model says so: queued (looked for nowhere), then cancelled without a save
    waiting = submit("sft-demo", {"MODEL_PATH": status["params"]["MODEL_PATH"],
                                  "DATASET_PATH": status["params"]["DATASET_PATH"]}, queue="views-idle")
    assert http.get(f"/jobs/{waiting.id}").json()["model"]["note"] == "No model is published: it is queued."
    assert waiting.cancel() is JobStatus.CANCELLED
    model = http.get(f"/jobs/{waiting.id}").json()["model"]
    assert model["published"] is False and model["files"] == []
    assert "there is no deepe.json at" in model["note"] and "cancelled without --save" in model["note"]
    assert "No model is published: there is no deepe.json" in cli_here("status", waiting.id).stdout


def test_status_and_the_api_show_the_files_under_the_key_deepe_json_names_on_a_store(
        workers: list[Worker], tmp_path: Path, moto: MotoServer, bucket_url: str,  # noqa: F811
        on_store: ObjectStore, http: TestClient) -> None:  # noqa: F811
    # Given a job that published its model on the store
    worker_on_store(workers, "views-s3", tmp_path / "disk", moto, bucket_url)
    job = submit("sft-demo", params(bucket_url, MAX_STEPS=2), queue="views-s3")
    assert job.wait(timeout=240) is JobStatus.SUCCEEDED, job.info()
    url = job.info()["output_dir"]
    rel = on_store.rel_of(url)
    manifest = on_store.read_json(f"{rel}/deepe.json")
    assert manifest is not None
    files = {name: int(info["size"]) for name, info in on_store.files(f"{rel}/{manifest['files']}").items()}
    assert "adapter_model.safetensors" in files
    # and, beside it, what a stale attempt uploaded and never published
    on_store.put_bytes(f"{rel}/a9-deadbeef/adapter_model.safetensors", b"stale")
    # Then status and the API show the files under the key deepe.json names, and only those
    status = json.loads(cli_here("status", job.id, "--json").stdout)
    for model in (status["model"], http.get(f"/jobs/{job.id}").json()["model"]):
        assert model["published"] is True and model["url"] == url
        assert shown(model) == files and model["total_bytes"] == sum(files.values())
    # And once deepe.json is gone there is no model, whatever files stay under OUTPUT_DIR
    on_store.remove(f"{rel}/deepe.json")
    model = http.get(f"/jobs/{job.id}").json()["model"]
    assert model["published"] is False and f"there is no deepe.json at {url}" in model["note"]


def test_run_local_reads_inputs_from_the_store_through_the_cache_and_publishes_there_fenced(
        moto: MotoServer, bucket_url: str, on_store: ObjectStore, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    from deepe_tasks.ui.local import find_method_file, run_method_file

    # Given a machine on the store, with a cache of its own
    monkeypatch.setenv("DEEPE_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    output = f"models/local-{uuid.uuid4().hex[:6]}"
    args = ["run-local", "sft-demo", "-p", "MODEL_PATH=base/tiny-llama", "-p", f"DATASET_PATH={bucket_url}/data/colors.jsonl",
            "-p", "MAX_STEPS=2", "-p", "BATCH_SIZE=4", "-p", "MAX_SEQ_LENGTH=64", "-p", "LORA_RANK=4",
            "-p", f"OUTPUT_DIR={output}"]
    try:
        # When `deepe run-local` runs a method with inputs on the store
        done = cli_here(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        # Then it read them through the worker-style cache, and published the model on the store
        assert f"OK: the model, the tokenizer and deepe.json are in {bucket_url}/{output}" in done.stdout
        assert len(list((tmp_path / "cache" / "inputs").glob("*/.deepe-complete"))) == 2  # the model, the dataset
        manifest = on_store.read_json(f"{output}/deepe.json")
        assert manifest is not None and manifest["worker"] == "local" and manifest["claim"].startswith("local:")
        assert manifest["files"].startswith("a1-")  # uploaded under the attempt's key, then deepe.json created
        assert "adapter_model.safetensors" in on_store.files(f"{output}/{manifest['files']}")
        # And a second run to the same OUTPUT_DIR is refused before it trains, and leaves the model alone
        again = cli_here(*args)
        assert again.returncode == 2
        assert f"holds the model of job {manifest['job']}" in again.stderr and "Choose another OUTPUT_DIR" in again.stderr
        with pytest.raises(InvalidParams, match="already holds a model .*which a store cannot replace; choose another"):
            run_method_file(find_method_file("sft-demo"), {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args[3::2]},
                            lambda e: None, job_id=manifest["job"])  # even a run of the same job id
        assert on_store.read_json(f"{output}/deepe.json") == manifest
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_the_job_page_lists_the_model_files_and_their_total(
        folder_job: str, api_url: str, browser: Any) -> None:  # noqa: F811
    from deepe_tasks import Job

    files = on_disk(Path(Job(folder_job).info()["output_dir"]))
    page = sign_in(browser, api_url)
    page.goto(page.url.split("#")[0] + f"#/jobs/{folder_job}")
    page.wait_for_selector("#model-files")
    names = page.eval_on_selector_all("#model-files tbody tr", "rows => rows.map((r) => r.dataset.file)")
    assert sorted(names) == sorted(files)
    assert page.inner_text("#model-total").endswith(("B", "KiB", "MiB"))
    assert page.inner_text("#model-files tfoot").startswith(f"{len(files)} files")
    page.close()
