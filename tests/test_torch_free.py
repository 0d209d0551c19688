"""The submit side needs no PyTorch: a venv installed without the `train` extra submits, merges,
cancels, shows a job and serves the API, against a real Redis and a real worker (which runs
in the full venv). On 47a908e `deepe merge` crashed there with ModuleNotFoundError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import Job, JobStatus
from deepe_tasks.fixtures.embedded import free_port
from tests.helpers import Worker, wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv with deepe and its `api` extra, and nothing of the training stack."""
    venv = tmp_path_factory.mktemp("torch-free") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "-c", str(ROOT / "constraints" / "ci.txt"),
                           f"{ROOT}[api]"], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail("could not install deepe without the train extra:\n" + done.stderr[-3000:])
    yield venv


def deepe(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / "deepe"), *args], capture_output=True, text=True, timeout=120,
                          cwd=venv, env=env)


def test_the_light_venv_has_no_training_library(light: Path) -> None:
    for module in ("torch", "transformers", "trl", "peft", "datasets"):
        done = subprocess.run([str(light / "bin" / "python"), "-c", f"import {module}"], capture_output=True, text=True)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, module


def test_submit_status_merge_and_cancel_work_without_torch(light: Path, workers: list[Worker], tmp_path: Path,
                                                          sft_params: dict[str, Any]) -> None:
    workers.append(Worker("light-q", tmp_path / "worker.log").start())
    args = [a for k, v in sft_params.items() for a in ("-p", f"{k}={v}")]
    # Submit from the light venv; the worker trains it
    done = deepe(light, "submit", "sft-demo", *args, "--queue", "light-q", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = json.loads(done.stdout)["id"]
    assert Job(job_id).wait(timeout=240) is JobStatus.SUCCEEDED, Job(job_id).info().get("error")
    status = deepe(light, "status", job_id, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "succeeded", status.stderr
    # Merge it, from the light venv (the crash of issue 24)
    merged = deepe(light, "merge", job_id, "--wait")
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert (Path(merged.stdout.strip().splitlines()[-1]) / "config.json").exists()
    # Cancel a job that no worker takes
    queued = deepe(light, "submit", "sft-demo", *args, "--queue", "nobody-light-q", "--json")
    assert queued.returncode == 0, queued.stderr
    waiting = json.loads(queued.stdout)["id"]
    cancelled = deepe(light, "cancel", waiting)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert Job(waiting).status() is JobStatus.CANCELLED


def test_the_api_serves_and_merges_without_torch(light: Path, workers: list[Worker], tmp_path: Path,
                                                 sft_params: dict[str, Any]) -> None:
    workers.append(Worker("light-api-q", tmp_path / "worker.log").start())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DEEPE_API_TOKENS"] = "light-token"
    api = subprocess.Popen([str(light / "bin" / "deepe"), "api", "--host", "127.0.0.1", "--port", str(port)], env=env,
                           cwd=light, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": "Bearer light-token", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    try:
        wait_for(lambda: _answers(base), timeout=60)
        code, made = call("POST", "/jobs", {"method": "sft-demo", "params": sft_params, "queue": "light-api-q"})
        assert code == 201, made
        job = Job(made["id"])
        assert job.wait(timeout=240) is JobStatus.SUCCEEDED, job.info().get("error")
        code, merge = call("POST", f"/jobs/{job.id}/merge")
        assert code == 201, merge
        assert Job(merge["id"]).wait(timeout=240) is JobStatus.SUCCEEDED
        code, shown = call("GET", f"/jobs/{merge['id']}")
        assert code == 200 and shown["status"] == "succeeded"
    finally:
        api.terminate()
        api.wait(timeout=30)


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False
