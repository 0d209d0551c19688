"""A new user's mistakes, caught at submit with a message that names the fix: misspelt
parameters, paths that are not there, method code the platform would reject; built-in methods
found from any folder; and the command line's small things (ids, exit codes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from deepe_tasks import submit
from deepe_tasks.contract.check import Problem, check_source
from deepe_tasks.contract.hardware import has_cuda
from deepe_tasks.core import jobstore, keys
from deepe_tasks.core.errors import InvalidParams, MethodContractError
from deepe_tasks.core.settings import get_settings
from tests.helpers import cli_here

DECLARING = '''"""Declares a parameter of its own."""
METHOD_PARAMS = {
    "temperature": (float, 0.7, "sampling temperature, 0 to 2"),
    "style": (str, "plain", "the answer style"),
}
model = tokenizer = trainer = None
'''


def jobs_in_redis(r: redis.Redis) -> int:
    return int(r.zcard(keys.JOBS_INDEX))


def args(params: dict[str, Any]) -> list[str]:
    return [a for k, v in params.items() for a in ("-p", f"{k}={v}")]


# ---- 1. parameters --------------------------------------------------------------------------

@pytest.mark.parametrize("key, meant", [("MAX_STEP", "MAX_STEPS"), ("max-steps", "MAX_STEPS"),
                                        ("Learning_Rate", "LEARNING_RATE"), ("BATCHSIZE", "BATCH_SIZE"),
                                        ("promptinputcolumn", "PromptInputColumn")])
def test_a_near_miss_of_a_parameter_is_refused_everywhere(key: str, meant: str, sft_params: dict[str, Any],
                                                          r: redis.Redis, http: TestClient) -> None:
    before = jobs_in_redis(r)
    with pytest.raises(InvalidParams, match=f"did you mean {meant}\\?"):
        submit("sft-demo", {**sft_params, key: "5"})
    done = cli_here("submit", "sft-demo", *args({**sft_params, key: "5"}))
    assert done.returncode == 2 and f"did you mean {meant}?" in done.stderr
    answer = http.post("/jobs", json={"method": "sft-demo", "params": {**sft_params, key: "5"}})
    assert answer.status_code == 422 and f"did you mean {meant}?" in answer.json()["detail"]
    assert jobs_in_redis(r) == before  # nothing queued


def test_other_unknown_keys_are_passed_on_and_submit_says_which(sft_params: dict[str, Any],
                                                               http: TestClient) -> None:
    done = cli_here("submit", "sft-demo", *args({**sft_params, "prompt_suffix": "Answer:", "seed": "3"}))
    assert done.returncode == 0, done.stderr
    assert "custom parameters" in done.stderr and "prompt_suffix, seed" in done.stderr
    answer = http.post("/jobs", json={"method": "sft-demo", "params": {**sft_params, "notes": "x"}})
    assert answer.status_code == 201 and answer.json()["custom_params"] == ["notes"]


def test_a_method_declares_its_own_parameters_which_are_typed_defaulted_and_shown(
        store: Path, sft_params: dict[str, Any], http: TestClient) -> None:
    (store / "declares01.py").write_text(DECLARING)
    job = submit("declares01", {**sft_params, "temperature": "0.25"})
    params = job.record().params
    assert params["temperature"] == 0.25 and params["style"] == "plain" and job.custom_params == []
    with pytest.raises(InvalidParams, match="temperature='hot' is not valid .*allowed: float, sampling temperature"):
        submit("declares01", {**sft_params, "temperature": "hot"})
    with pytest.raises(InvalidParams, match="did you mean temperature"):
        submit("declares01", {**sft_params, "temprature": "0.3"})
    shown = cli_here("methods", "show", "declares01", "--json")
    declared = [p for p in json.loads(shown.stdout)["params"] if p["declared_by"] == "method"]
    assert declared == [{"name": "temperature", "type": "float", "default": 0.7,
                         "help": "sampling temperature, 0 to 2", "declared_by": "method"},
                        {"name": "style", "type": "str", "default": "plain", "help": "the answer style",
                         "declared_by": "method"}]
    over_http = http.get("/methods/declares01").json()
    assert [p["name"] for p in over_http["params"] if p["declared_by"] == "method"] == ["temperature", "style"]


# ---- 2. paths -------------------------------------------------------------------------------

def test_paths_that_are_not_there_are_refused_with_the_resolved_path(sft_params: dict[str, Any], storage: Path,
                                                                    tmp_path: Path, r: redis.Redis) -> None:
    before = jobs_in_redis(r)
    with pytest.raises(InvalidParams, match=f"MODEL_PATH='models/base' resolves to {storage}/models/base, which is "
                                            "not a folder here"):
        submit("sft-demo", {**sft_params, "MODEL_PATH": "models/base"})
    (storage / "empty-model").mkdir(exist_ok=True)
    with pytest.raises(InvalidParams, match="which has no config.json"):
        submit("sft-demo", {**sft_params, "MODEL_PATH": str(storage / "empty-model")})
    with pytest.raises(InvalidParams, match="DATASET_PATH='data/train.jsonl' resolves to .*, which does not exist"):
        submit("sft-demo", {**sft_params, "DATASET_PATH": "data/train.jsonl"})
    assert jobs_in_redis(r) == before


def test_a_submitter_without_the_storage_turns_the_check_off_and_the_worker_says_it_clearly(
        sft_params: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPE_CHECK_PATHS", "false")
    get_settings.cache_clear()
    try:
        job = submit("sft-demo", {**sft_params, "MODEL_PATH": "models/not-here"})
        assert job.record().params["MODEL_PATH"].endswith("models/not-here")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    # What the worker then says, before any library is called (the runner, as a worker runs it)
    from deepe_tasks.core.records import JobSpec, JobStatus
    from deepe_tasks.job.runner import Runner

    spec = JobSpec(job_id=job.id, method="sft-demo", method_sha256="x", source="model = tokenizer = trainer = 1\n",
                   params=job.record().params, storage_root=str(get_settings().storage_root), worker="w")
    result = Runner(spec, lambda e: None).run()
    assert result.status is JobStatus.FAILED and result.phase == "building the model"
    assert (result.error or "").startswith("Failed while building the model: MODEL_PATH='") and "Repo id" not in (
        result.error or "")


# ---- 3. methods from anywhere ---------------------------------------------------------------

def test_built_in_methods_are_found_from_any_folder(tmp_path: Path, sft_params: dict[str, Any]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DEEPE_METHOD_STORE"}
    listed = subprocess.run([sys.executable, "-m", "deepe_tasks", "methods", "list", "--json"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    kinds = {m["name"]: m["kind"] for m in json.loads(listed.stdout)}
    assert kinds["sft-demo"] == "built-in" and kinds["grpo-demo"] == "built-in"
    unknown = cli_here("submit", "no-such-method", *args(sft_params))
    assert unknown.returncode == 2 and "known methods: " in unknown.stderr and "sft-demo" in unknown.stderr


# ---- 4. the static check at submit ----------------------------------------------------------

HIDDEN = '''import argparse
def main():
    model = 1
    tokenizer = 2
    trainer = 3
if __name__ == "__main__":
    main()
'''


def test_submit_refuses_what_the_check_refuses_with_its_message(store: Path, sft_params: dict[str, Any],
                                                                 r: redis.Redis, http: TestClient) -> None:
    (store / "hidden01.py").write_text(HIDDEN)
    before = jobs_in_redis(r)
    with pytest.raises(MethodContractError, match=r"`model`, `tokenizer` and `trainer` are defined only inside the "
                                                  r"function `main\(\)` \(line 2\)"):
        submit("hidden01", sft_params)
    done = cli_here("submit", "hidden01", *args(sft_params))
    assert done.returncode == 2 and "deepe methods check hidden01" in done.stderr
    assert http.post("/jobs", json={"method": "hidden01", "params": sft_params}).status_code == 422
    # --no-check (check=false over HTTP) queues it anyway, for code the check misreads
    forced = cli_here("submit", "hidden01", "--no-check", "--queue", "first-hour-q", *args(sft_params))
    assert forced.returncode == 0, forced.stderr
    over_http = http.post("/jobs", json={"method": "hidden01", "params": sft_params, "check": False,
                                         "queue": "first-hour-q"})
    assert over_http.status_code == 201
    before += 2
    checked = cli_here("methods", "check", "hidden01")
    assert checked.returncode == 1 and "defined only inside the function `main()`" in checked.stdout
    assert jobs_in_redis(r) == before


@pytest.mark.parametrize("code, problem", [
    ("t = SFTTrainer(model, callbacks=[callback])\nt.train()\n", Problem.PLATFORM_CALL),
    ("SFTTrainer(model, callbacks=[callback]).train()\n", Problem.PLATFORM_CALL),
    ("open(os.path.join(OUTPUT_DIR, 'notes.txt'), 'w')\n", Problem.WRITES_OUTPUT),
    ("Path(params.OUTPUT_DIR, 'x.json').write_text('{}')\n", Problem.WRITES_OUTPUT),
    ("m = AutoModelForCausalLM.from_pretrained('Qwen/Qwen2.5-0.5B')\n", Problem.HUB_DOWNLOAD),
    ("d = load_dataset('openai/gsm8k')\n", Problem.HUB_DOWNLOAD),
    ("a = SFTConfig(bf16=True)\n", Problem.NEEDS_GPU),
    ("a = SFTConfig(output_dir='out', max_steps=5)\n", Problem.NEEDS_GPU),  # TRL's bf16 default: on
    ('if __name__ == "__main__":\n    trainer = 1\n', Problem.HIDDEN_NAME),
])
def test_the_check_sees_each_kind_of_problem(code: str, problem: Problem) -> None:
    base = "model = 1\ntokenizer = 2\ntrainer = T(callbacks=[callback])\n"
    if problem is Problem.HIDDEN_NAME:
        base = base.replace("trainer = T(callbacks=[callback])\n", "")
    report = check_source(base + code, gpu=False)
    assert [f.problem for f in report.findings] == [problem], report.findings


def test_names_a_function_called_at_the_top_level_makes_global_count_as_defined() -> None:
    source = ("def build():\n    global model, tokenizer\n    model = 1\n    tokenizer = 2\n\n"
              "build()\ntrainer = T(callbacks=[callback])\n")
    assert check_source(source, gpu=True).ok
    guarded = source.replace("build()\n", 'if __name__ == "__main__":\n    build()\n')
    assert [f.problem for f in check_source(guarded, gpu=True).findings] == [Problem.HIDDEN_NAME]


def test_the_check_leaves_alone_what_is_fine() -> None:
    fine = ("model = m\nmodel.train()\ntokenizer = t\ntrainer = T(callbacks=[callback])\n"
            "m2 = AutoModelForCausalLM.from_pretrained(MODEL_PATH)\nd = load_dataset('json', data_files=DATASET_PATH)\n"
            "c = SFTConfig(output_dir=OUTPUT_DIR, bf16=torch.cuda.is_available())\n"
            "if LOAD_IN_4BIT:\n    q = BitsAndBytesConfig(load_in_4bit=True)\n")
    report = check_source(fine, gpu=False)
    assert report.findings == []
    assert check_source("model = tokenizer = trainer = 1\na = SFTConfig(bf16=True)\n", gpu=True).findings == []


# ---- 7. the command line's small things -----------------------------------------------------

def failed_job(r: redis.Redis, sft_params: dict[str, Any], job_id: str | None = None) -> str:
    job = submit("sft-demo", sft_params, job_id=job_id, queue="first-hour-q")  # no worker takes this queue
    assert jobstore.fail_queued(r, job.id, "it failed (test)")
    return job.id


def test_status_exits_1_for_a_failed_job_and_2_for_an_unknown_one(r: redis.Redis, sft_params: dict[str, Any]) -> None:
    job_id = failed_job(r, sft_params)
    assert cli_here("status", job_id).returncode == 1
    assert cli_here("status", job_id, "--json").returncode == 1
    unknown = cli_here("status", "no-such-job-here")
    assert unknown.returncode == 2 and "There is no job 'no-such-job-here'" in unknown.stderr


def test_a_unique_id_prefix_is_accepted_and_an_ambiguous_one_refused(r: redis.Redis,
                                                                     sft_params: dict[str, Any]) -> None:
    stem = uuid.uuid4().hex[:10]
    first = failed_job(r, sft_params, job_id=f"{stem}-a")
    failed_job(r, sft_params, job_id=f"{stem}-b")
    shown = cli_here("status", f"{stem}-a"[:-1] + "a", "--json")  # the whole id
    assert json.loads(shown.stdout)["id"] == first
    by_prefix = cli_here("logs", first[:12])
    assert by_prefix.returncode == 0 and "it failed (test)" in by_prefix.stdout
    ambiguous = cli_here("status", stem)
    assert ambiguous.returncode == 2 and "is the start of several job ids" in ambiguous.stderr


def test_ids_and_paths_are_never_cut_when_piped(r: redis.Redis, sft_params: dict[str, Any]) -> None:
    long_id = "a-very-long-job-id-" + "x" * 60 + uuid.uuid4().hex[:8]
    failed_job(r, sft_params, job_id=long_id)
    listed = cli_here("jobs", "--limit", "500")
    assert long_id in listed.stdout
    status = cli_here("status", long_id)
    assert json.loads(cli_here("status", long_id, "--json").stdout)["output_dir"] in status.stdout


@pytest.mark.e2e
def test_checkpoints_go_after_a_publish_and_a_missing_column_is_named_with_the_columns_there(
        worker: Any, store: Path, storage: Path, sft_params: dict[str, Any]) -> None:
    from deepe_tasks.core.records import JobStatus
    from tests.helpers import TRL_SNIPPET, write_method

    # A method that checkpoints every step, so that each job leaves checkpoints behind
    write_method(store, "saves01", TRL_SNIPPET.replace("logging_steps=1,", "logging_steps=1, save_steps=1,"))
    columns = {"PromptInputColumn": "instruction", "PromptOutputColumn": "output"}
    good = submit("saves01", {**sft_params, **columns, "MAX_STEPS": 2})
    bad = submit("saves01", {**sft_params, **columns, "MAX_STEPS": 2, "PromptOutputColumn": "nope"})
    assert good.wait(timeout=180) is JobStatus.SUCCEEDED, good.info()["error"]
    assert bad.wait(timeout=180) is JobStatus.FAILED
    from deepe_tasks import EventKind

    assert [e.step for e in good.events() if e.kind is EventKind.CHECKPOINT] == [1, 2]  # there were some
    assert not list((storage / "jobs" / good.id / "attempts").glob("*/checkpoints"))  # DEEPE_KEEP_CHECKPOINTS
    assert (Path(good.info()["output_dir"]) / "deepe.json").is_file()
    assert "The dataset has no column 'nope' (PromptOutputColumn); the dataset's columns are" in bad.info()["error"]


@pytest.mark.e2e
@pytest.mark.skipif(has_cuda(), reason="what a fleet without CUDA sees")
def test_load_in_4bit_on_a_worker_without_cuda_is_warned_in_the_jobs_events(
        worker: Any, sft_params: dict[str, Any]) -> None:
    from deepe_tasks import EventKind
    from deepe_tasks.core.records import JobStatus

    job = submit("sft-demo", {**sft_params, "LOAD_IN_4BIT": "true"})
    assert job.wait(timeout=180) is JobStatus.FAILED
    warnings = [e.message for e in job.events() if e.kind is EventKind.LOG and e.message.startswith("warning: ")]
    assert any("LOAD_IN_4BIT=true asks for a 4-bit base model (bitsandbytes), which needs a CUDA GPU" in w
               and "Set LOAD_IN_4BIT=false" in w for w in warnings), warnings
    assert "set LOAD_IN_4BIT=false" in job.info()["error"]
