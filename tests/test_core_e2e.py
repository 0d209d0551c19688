"""The main path, end to end: a real Redis, a real worker process, real TRL training."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import EventKind, Job, JobStatus, submit
from deepe_tasks.contract.methods import BUILTIN
from deepe_tasks.core.connection import get_redis
from tests.helpers import (
    SLOW_METHOD,
    TRL_SNIPPET,
    Worker,
    paste_into_template,
    run_cli,
    wait_for,
    write_method,
)

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def custom01(store: Path) -> str:
    result = run_cli("methods", "new", "custom01")
    assert result.returncode == 0, result.stderr
    paste_into_template(store / "custom01.py", TRL_SNIPPET)
    check = run_cli("methods", "check", "custom01")
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr
    return "custom01"


def finished(job: Job, worker: Worker, timeout: float = 180) -> JobStatus:
    try:
        return job.wait(timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"job {job.id} did not finish; worker log:\n{worker.log()[-4000:]}") from None


def test_a_pasted_trl_snippet_trains_on_a_worker_and_saves_a_reloadable_model(
        custom01: str, worker: Worker, sft_params: dict[str, object]) -> None:
    # Given the template with a plain TRL snippet pasted in, submitted from the command line
    args = [f"{k}={v}" for k, v in {**sft_params, "PromptInputColumn": "instruction",
                                     "PromptOutputColumn": "output"}.items()]
    result = run_cli("submit", custom01, *sum((["-p", a] for a in args), []), "--json")
    assert result.returncode == 0, result.stderr
    job = Job(json.loads(result.stdout)["id"])

    # When the worker has run it
    assert finished(job, worker) is JobStatus.SUCCEEDED, job.info()["error"]

    # Then the events tell the story in order, with a loss on every step
    events = list(job.events())
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.QUEUED and kinds[-1] is EventKind.SUCCEEDED
    assert kinds.index(EventKind.STARTED) < kinds.index(EventKind.TRAINING) < kinds.index(EventKind.SAVING)
    loss_steps = [e.step for e in events if e.kind is EventKind.LOG and "loss" in e.metrics]
    assert loss_steps == [1, 2, 3, 4]
    assert all(e.max_steps == 4 for e in events if e.kind is EventKind.LOG)
    assert [e.id for e in events] == sorted(e.id or "" for e in events)

    # And the saved folder is complete, has its manifest, reloads and generates
    info = job.info()
    out = Path(info["output_dir"])
    manifest = json.loads((out / "deepe.json").read_text())
    assert manifest["job"] == job.id and manifest["method"] == "custom01"
    assert manifest["method_sha256"] == info["method_sha256"]
    assert manifest["params"]["MAX_STEPS"] == 4 and "loss" in manifest["metrics"]
    assert {"torch", "transformers", "peft", "trl"} <= set(manifest["versions"])
    assert manifest["worker"] == worker.hostname and manifest["finished_at"] > manifest["started_at"]
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]

    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("What colour is the sky?\n", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] > ids.shape[1]

    # And the job folder keeps a copy of every event
    lines = (Path(info["params"]["OUTPUT_DIR"]).parent.parent / "jobs" / job.id / "events.jsonl").read_text()
    assert len(lines.splitlines()) >= len(events) - 1  # all but `queued`, written by the client


def test_events_replay_from_the_start_and_from_any_id(worker: Worker, sft_params: dict[str, object]) -> None:
    job = submit("sft-demo", sft_params)
    assert finished(job, worker) is JobStatus.SUCCEEDED
    everything = list(job.events())
    middle = everything[len(everything) // 2]
    rest = list(job.events(since=middle.id or ""))
    assert [e.id for e in rest] == [e.id for e in everything if (e.id or "") > (middle.id or "")]
    assert [e.id for e in job.events(follow=True)] == [e.id for e in everything]
    # Readers in any language: `data` holds one JSON event; `a` and `s` say which attempt wrote
    # it and its number within that attempt (0 for the platform's own events)
    raw: Any = get_redis().xrange(f"deepe:events:{job.id}")
    assert all(set(fields) == {"data", "a", "s"} for _, fields in raw)
    assert all(json.loads(f["data"])["attempt"] in (None, int(f["a"])) for _, f in raw)
    own = [int(f["s"]) for _, f in raw if f["s"] != "0"]
    assert own == list(range(1, len(own) + 1))
    first = json.loads(raw[0][1]["data"])
    assert {"kind", "job", "ts", "step", "max_steps", "metrics", "message"} <= set(first)


def test_sft_demo_learns_a_toy_task(worker: Worker, sft_params: dict[str, object]) -> None:
    job = submit("sft-demo", {**sft_params, "MAX_STEPS": 30})
    assert finished(job, worker) is JobStatus.SUCCEEDED, job.info()["error"]
    losses = [e.metrics["loss"] for e in job.events() if e.kind is EventKind.LOG and "loss" in e.metrics]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


REFUSED = [
    (["submit", "no-such-method", "-p", "MODEL_PATH=m", "-p", "DATASET_PATH=d"], "no method 'no-such-method'"),
    (["submit", "../sft-demo", "-p", "MODEL_PATH=m", "-p", "DATASET_PATH=d"], "not a method name"),
    (["submit", "sft-demo", "-p", "MODEL_PATH=m", "-p", "DATASET_PATH=d", "-p", "MAX_STEPS=ten"], "MAX_STEPS='ten'"),
    (["submit", "sft-demo", "-p", "MODEL_PATH=m", "-p", "DATASET_PATH=d", "-p", "LEARNING_RATE=-1"], "LEARNING_RATE='-1'"),
    (["submit", "sft-demo", "-p", "MODEL_PATH=m", "-p", "DATASET_PATH=d", "-p", "OUTPUT_DIR=../out"], "outside the storage root"),
    (["submit", "sft-demo", "-p", "DATASET_PATH=d"], "MODEL_PATH is required"),
    (["submit", "sft-demo", "-p", "MODEL_PATH"], "not KEY=VALUE"),
]


@pytest.mark.parametrize("args, message", REFUSED, ids=[m for _, m in REFUSED])
def test_bad_input_is_refused_at_submit_before_anything_is_queued(args: list[str], message: str) -> None:
    client = get_redis()
    before = client.zcard("deepe:jobs"), client.llen("refused-q")
    result = run_cli(*args, "--queue", "refused-q")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert (client.zcard("deepe:jobs"), client.llen("refused-q")) == before


FAILING_METHODS = {
    "bad-syntax": ("model = (\n", "loading the method", "line 1"),
    "raises": ("raise ValueError('boom from the method')\n", "ValueError: boom from the method", "raises.py line 1"),
    "no-trainer": (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)\n"
        "model = AutoModelForCausalLM.from_pretrained(MODEL_PATH)\n",
        "`trainer` is not defined", "contract"),
    "hard-exit": ("import os\nos._exit(3)\n", "exited with code 3", "job process"),
    "segfault": ("import ctypes\nctypes.string_at(0)\n", "killed by SIGSEGV", "job process"),
}


@pytest.mark.parametrize("name", sorted(FAILING_METHODS))
def test_a_broken_method_fails_with_a_readable_message_and_the_worker_goes_on(
        name: str, store: Path, worker: Worker, sft_params: dict[str, object]) -> None:
    source, *expected = FAILING_METHODS[name]
    write_method(store, name, source)
    job = submit(name, sft_params, check=False)  # the worker's side of it
    assert finished(job, worker) is JobStatus.FAILED
    error = job.info()["error"]
    for words in expected:
        assert words in error
    assert "Traceback" not in error
    events = list(job.events())
    assert events[-1].kind is EventKind.FAILED and events[-1].message == error
    assert worker.alive()


@pytest.mark.parametrize("change, expected", [
    ({"DATASET_PATH": "data/missing.jsonl"}, ["loading the dataset", "does not exist", "DATASET_PATH"]),
    ({"PromptInputColumn": "prompt_text"}, ["no column 'prompt_text'", "'instruction', 'output'"]),
    ({"DATASET_PATH": "data/empty.jsonl"}, ["loading the dataset", "has no rows"]),
])
def test_bad_data_fails_naming_the_phase_and_the_worker_then_runs_a_good_job(
        change: dict[str, str], expected: list[str], worker: Worker, sft_params: dict[str, object],
        storage: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deepe_tasks.core.settings import get_settings

    (storage / "data" / "empty.jsonl").touch()
    # A submitter that does not see the storage, so that the worker is the one to find it missing
    monkeypatch.setenv("DEEPE_CHECK_PATHS", "false")
    get_settings.cache_clear()
    try:
        bad = submit("sft-demo", {**sft_params, **change})
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert finished(bad, worker) is JobStatus.FAILED
    for words in expected:
        assert words in bad.info()["error"]
    good = submit("sft-demo", sft_params)
    assert finished(good, worker) is JobStatus.SUCCEEDED


def test_load_in_4bit_on_cpu_fails_clearly(worker: Worker, sft_params: dict[str, object]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; scripts/gpu-check.sh covers 4-bit loading")
    job = submit("sft-demo", {**sft_params, "LOAD_IN_4BIT": "true"})
    assert finished(job, worker) is JobStatus.FAILED
    assert "Failed while building the model: RuntimeError: LOAD_IN_4BIT needs a CUDA GPU" in job.info()["error"]


def test_the_worker_answers_inspect_while_a_job_runs(store: Path, worker: Worker,
                                                     sft_params: dict[str, object]) -> None:
    from deepe_tasks.core.broker import app

    write_method(store, "slow", SLOW_METHOD)
    job = submit("slow", {**sft_params, "MAX_STEPS": 40, "PromptInputColumn": "instruction",
                          "PromptOutputColumn": "output"})
    wait_for(lambda: job.status().is_final or any(e.kind is EventKind.TRAINING for e in job.events()),
             timeout=120)
    active = app.control.inspect(timeout=5).active() or {}
    running = [t for tasks in active.values() for t in tasks]
    assert [t["id"] for t in running] == [job.id]
    assert running[0]["name"] == "deepe.train"
    assert job.status() is JobStatus.RUNNING
    assert finished(job, worker) is JobStatus.SUCCEEDED


def test_a_queued_job_runs_the_source_pinned_at_submit(store: Path, sft_params: dict[str, object],
                                                      tmp_path: Path) -> None:
    # Given a method submitted to a queue that no worker consumes yet
    source = (BUILTIN / "sft-demo.py").read_text()
    write_method(store, "pinned", source)
    job = submit("pinned", sft_params, queue="pinned-q")
    # When the file is broken after the submit, and only then a worker comes
    write_method(store, "pinned", "raise RuntimeError('edited after submit')\n")
    # (this worker is started the plain Celery way)
    late = Worker("pinned-q", tmp_path / "worker.log", command=[
        sys.executable, "-m", "celery", "-A", "deepe_tasks", "worker", "-Q", "pinned-q",
        "--hostname", f"pinned-{os.getpid()}@%h"])
    late.process.name = f"pinned-{os.getpid()}@%h"
    late.start()
    try:
        # Then the job ran the source it was submitted with
        assert finished(job, late) is JobStatus.SUCCEEDED, job.info()["error"]
    finally:
        late.stop()
    manifest = json.loads((Path(job.info()["output_dir"]) / "deepe.json").read_text())
    from deepe_tasks.contract.methods import sha256_of

    assert manifest["method_sha256"] == sha256_of(source)


def test_cancelling_a_queued_job_means_it_never_starts(sft_params: dict[str, object]) -> None:
    job = submit("sft-demo", sft_params, queue="nobody-q")
    assert job.cancel() is JobStatus.CANCELLED
    assert job.status() is JobStatus.CANCELLED
    assert [e.kind for e in job.events()] == [EventKind.QUEUED, EventKind.CANCELLED]
    from deepe_tasks.core.errors import InvalidJobState

    with pytest.raises(InvalidJobState, match="already cancelled"):
        job.cancel()
    result = run_cli("cancel", job.id)
    assert result.returncode == 2 and "already cancelled" in result.stderr



def test_worker_gpus_option_sets_cuda_visible_devices_for_its_jobs(
        store: Path, tmp_path: Path, sft_params: dict[str, object]) -> None:
    write_method(store, "show-gpus", "import os\nraise RuntimeError('CVD=' + os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))\n")
    gpu_worker = Worker("gpus-q", tmp_path / "worker.log", extra_args=["--gpus", "3"]).start()
    try:
        job = submit("show-gpus", sft_params, queue="gpus-q", check=False)
        assert finished(job, gpu_worker) is JobStatus.FAILED
    finally:
        gpu_worker.stop()
    assert "CVD=3" in job.info()["error"]
