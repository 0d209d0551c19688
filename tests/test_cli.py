"""The command line: methods, jobs, and `deepe demo` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Worker, cli_here, copy_shipped_store, run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_methods_list_shows_each_description() -> None:
    result = cli_here("methods", "list", "--json")
    assert result.returncode == 0
    listed = {m["name"]: m for m in json.loads(result.stdout)}
    assert listed["sft-demo"]["description"].startswith("SFT-Demo:")
    assert len(listed["sft-demo"]["sha256"]) == 64


def test_methods_new_refuses_to_overwrite(store: Path) -> None:
    assert cli_here("methods", "new", "fresh01").returncode == 0
    again = cli_here("methods", "new", "fresh01")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_methods_check_reports_contract_problems(store: Path) -> None:
    (store / "broken01.py").write_text("model = m\ntrainer = SFTTrainer(model)\ntrainer.train()\n")
    result = cli_here("methods", "check", "broken01")
    assert result.returncode == 1
    assert "`tokenizer`" in result.stdout and "Line 3 calls `trainer.train()`" in result.stdout
    assert "without `callbacks=[callback]`" in result.stdout


def test_submit_wait_status_logs_and_jobs(worker: Worker, sft_params: dict[str, object]) -> None:
    args = sum((["-p", f"{k}={v}"] for k, v in sft_params.items()), [])
    result = run_cli("submit", "sft-demo", *args, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.splitlines()[0].strip()
    assert "succeeded" in result.stdout and "training" in result.stdout

    status = json.loads(run_cli("status", job_id, "--json").stdout)
    assert status["status"] == "succeeded" and status["method"] == "sft-demo"
    logs = run_cli("logs", job_id)
    assert logs.returncode == 0 and "step 4/4" in logs.stdout and "succeeded" in logs.stdout
    listed = json.loads(run_cli("jobs", "--json").stdout)
    assert listed[0]["id"] == job_id


def test_a_failed_job_exits_1_when_waited_on(worker: Worker, sft_params: dict[str, object]) -> None:
    args = sum((["-p", f"{k}={v}"] for k, v in {**sft_params, "PromptOutputColumn": "nope"}.items()), [])
    result = run_cli("submit", "sft-demo", *args, "--wait")
    assert result.returncode == 1 and "no column 'nope'" in result.stdout


def test_status_of_an_unknown_job_is_a_clear_error() -> None:
    result = cli_here("status", "does-not-exist")
    assert result.returncode == 2 and "There is no job 'does-not-exist'" in result.stderr


def test_an_unreachable_redis_is_a_clear_error() -> None:
    env = {**os.environ, "DEEPE_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run([sys.executable, "-m", "deepe_tasks", "jobs"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_deepe_demo_runs_end_to_end(tmp_path: Path) -> None:
    # The README's first command, with no Redis configured: it brings its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPE_")}
    result = subprocess.run([sys.executable, "-m", "deepe_tasks", "demo", "--steps", "10"],
                            cwd=tmp_path, env={**env, "DEEPE_METHOD_STORE": str(copy_shipped_store(tmp_path / "store"))},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model saved to" in result.stdout
    saved = [p for p in (tmp_path / "deepe-data/models").iterdir()]
    assert len(saved) == 1 and (saved[0] / "deepe.json").is_file()


@pytest.mark.e2e
def test_the_gpu_check_says_it_was_skipped_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run scripts/gpu-check.sh itself")
    result = subprocess.run(["bash", str(ROOT / "scripts/gpu-check.sh")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "skipped" in json.loads(result.stdout)


def test_the_queue_side_and_the_worker_process_never_import_torch() -> None:
    # A backend installs deepe without PyTorch; a worker process must never touch CUDA.
    code = ("import sys, deepe_tasks, deepe_tasks.queue.client, deepe_tasks.ui.cli, deepe_tasks.ui.api, deepe_tasks.worker.tasks, "
            "deepe_tasks.worker.lifecycle, deepe_tasks.queue.queues, deepe_tasks.ui.metrics; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
