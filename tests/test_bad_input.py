"""The bad-input matrix: every case gets a clear message, at submit or as a FAILED job naming
the phase, and the worker survives to run a good job afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import EventKind, JobStatus, submit
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.errors import DeepeError, InvalidParams, JobExists, MethodNotFound
from tests.helpers import SLOW_METHOD, TRL_SNIPPET, Worker, wait_for, write_method

QUEUE = "matrix-q"


@pytest.fixture(scope="module")
def matrix_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A worker whose jobs get an address-space limit and a short grace period."""
    log = tmp_path_factory.mktemp("matrix") / "worker.log"
    w = Worker(QUEUE, log, env={"DEEPE_JOB_MEMORY_GB": "4", "DEEPE_CANCEL_GRACE": "2"}).start()
    yield w
    w.stop()


# ---- refused at submit ---------------------------------------------------------------------

SUBMIT_CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], type[DeepeError], str]] = {
    "unknown method": ("nope", {}, {}, MethodNotFound, "There is no method 'nope'"),
    "path in the name": ("../sft-demo", {}, {}, MethodNotFound, "not a method name"),
    "wrong type": ("sft-demo", {"BATCH_SIZE": "four"}, {}, InvalidParams, "BATCH_SIZE='four'"),
    "out of range": ("sft-demo", {"LORA_RANK": 0}, {}, InvalidParams, "LORA_RANK=0 is not valid"),
    "output outside storage": ("sft-demo", {"OUTPUT_DIR": "/etc"}, {}, InvalidParams, "outside the storage root"),
    "missing MODEL_PATH": ("sft-demo", {"MODEL_PATH": None}, {}, InvalidParams, "MODEL_PATH"),
    "over 1 MB": ("sft-demo", {"notes": "x" * 1_000_001}, {}, InvalidParams, "over the limit of 1000000"),
    "bad priority": ("sft-demo", {}, {"priority": 12}, InvalidParams, "priority=12"),
    "bad time limit": ("sft-demo", {}, {"time_limit": -5}, InvalidParams, "time_limit=-5"),
    "path in the job id": ("sft-demo", {}, {"job_id": "../../etc"}, InvalidParams, "job id '../../etc' is not valid"),
}


@pytest.mark.parametrize("case", sorted(SUBMIT_CASES))
def test_refused_at_submit_before_anything_is_queued(case: str, sft_params: dict[str, Any]) -> None:
    method, change, options, error, words = SUBMIT_CASES[case]
    params = {k: v for k, v in {**sft_params, **change}.items() if v is not None}
    client = get_redis()
    before = client.zcard("deepe:jobs"), client.llen("refused-q")
    with pytest.raises(error) as info:
        submit(method, params, queue="refused-q", **options)
    assert words in str(info.value)
    assert (client.zcard("deepe:jobs"), client.llen("refused-q")) == before


def test_an_explicit_duplicate_job_id_is_refused_and_the_first_job_is_untouched(sft_params: dict[str, Any]) -> None:
    first = submit("sft-demo", sft_params, queue="dup-id-q", job_id="matrix-dup")
    with pytest.raises(JobExists, match="already exists"):
        submit("sft-demo", {**sft_params, "MAX_STEPS": 99}, queue="dup-id-q", job_id="matrix-dup")
    assert first.info()["params"]["MAX_STEPS"] == sft_params["MAX_STEPS"]
    from deepe_tasks.queue.queues import waiting_in

    assert [w["id"] for w in waiting_in(get_redis(), "dup-id-q").waiting] == ["matrix-dup"]
    first.cancel()


# ---- failed as a job ----------------------------------------------------------------------

TRAINER_FAILS = TRL_SNIPPET.replace('target_modules="all-linear"', 'target_modules=["no_such_layer"]')
STEP_FAILS = SLOW_METHOD.replace(
    "time.sleep(float(params.get('step_sleep', 0.25)))",
    "if args[1].global_step == 2:\n            raise RuntimeError('exploded in step 2')")
MEMORY_HOG = "chunks = []\nwhile True:\n    chunks.append(bytearray(256 * 2**20))\n"
NEVER_RETURNS = "import time\nwhile True:\n    time.sleep(0.5)\n"

JOB_CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], list[str]]] = {
    # name: (method source or a built-in name, params change, submit options, words in the error)
    "import error": ("import no_such_package_xyz\n", {}, {},
                     ["loading the method", "No module named 'no_such_package_xyz'", "Install that package"]),
    "trainer.train() left in": (TRL_SNIPPET + "trainer.train()\n", {}, {},
                                ["breaks the method contract", "calls `trainer.train()`"]),
    "trainer fails to build": (TRAINER_FAILS, {}, {}, ["Failed while building the trainer", "no_such_layer"]),
    "exception in a step": (STEP_FAILS, {"MAX_STEPS": 5}, {}, ["Failed while training", "exploded in step 2"]),
    "corrupt model folder": ("sft-demo", {"MODEL_PATH": "corrupt-model"}, {},
                             ["Failed while building the model", "Check MODEL_PATH"]),
    "memory hog": (MEMORY_HOG, {}, {}, ["MemoryError", "Lower BATCH_SIZE"]),
    "never returns": (NEVER_RETURNS, {}, {"time_limit": 3},
                      ["time limit of 3 s reached", "was killed"]),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", sorted(JOB_CASES))
def test_failed_as_a_job_naming_the_phase(case: str, matrix_worker: Worker, store: Path, storage: Path,
                                          sft_params: dict[str, Any]) -> None:
    source, change, options, words = JOB_CASES[case]
    method = source
    if "\n" in source:
        method = write_method(store, "matrix-" + case.replace(" ", "-").replace("()", "").replace(".", ""), source)
    (storage / "corrupt-model").mkdir(exist_ok=True)
    (storage / "corrupt-model" / "config.json").write_text("{ this is not json")
    params = {**sft_params, "PromptInputColumn": "instruction", "PromptOutputColumn": "output", **change}
    job = submit(method, params, queue=QUEUE, check=False, **options)  # the worker's side of it
    assert job.wait(timeout=180) is JobStatus.FAILED
    error = job.info()["error"]
    for w in words:
        assert w in error, error
    assert "Traceback" not in error
    assert [e.kind for e in job.events()][-1] is EventKind.FAILED
    assert matrix_worker.alive()


@pytest.mark.e2e
def test_the_matrix_worker_still_runs_a_good_job(matrix_worker: Worker, sft_params: dict[str, Any]) -> None:
    assert submit("sft-demo", sft_params, queue=QUEUE).wait(timeout=180) is JobStatus.SUCCEEDED


# ---- on the wire --------------------------------------------------------------------------

class _Evil:
    """Unpickling this runs a shell command: what a pickle from a broker can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.e2e
def test_a_pickle_message_is_refused_without_being_executed(matrix_worker: Worker, tmp_path: Path,
                                                             sft_params: dict[str, Any]) -> None:
    from kombu.connection import Connection

    marker = tmp_path / "pwned"
    with Connection(os.environ["DEEPE_REDIS_URL"]) as conn:
        conn.Producer().publish(
            [[_Evil(marker)], {}, {}], routing_key=QUEUE, serializer="pickle",
            headers={"lang": "py", "task": "deepe.train", "id": "pickled-1", "argsrepr": "", "kwargsrepr": ""},
        )
    wait_for(lambda: "pickle" in matrix_worker.log().lower(), timeout=30)
    assert not marker.exists()
    assert "Refusing to deserialize" in matrix_worker.log() or "disallowed" in matrix_worker.log().lower()
    assert submit("sft-demo", sft_params, queue=QUEUE).wait(timeout=180) is JobStatus.SUCCEEDED


@pytest.mark.e2e
def test_messages_with_missing_fields_are_refused_and_logged(matrix_worker: Worker) -> None:
    from deepe_tasks.core.broker import app_for

    app = app_for(os.environ["DEEPE_REDIS_URL"])
    no_args = app.send_task("deepe.train", args=[], queue=QUEUE)
    unknown = app.send_task("deepe.train", args=["no-such-job"], queue=QUEUE)
    wait_for(lambda: "no-such-job: it has no job record" in matrix_worker.log(), timeout=30)
    wait_for(lambda: no_args.id in matrix_worker.log(), timeout=30)
    assert "missing 1 required positional argument: 'job_id'" in matrix_worker.log()
    assert unknown.id in matrix_worker.log() and matrix_worker.alive()


def test_a_job_whose_message_cannot_be_sent_is_recorded_as_failed(sft_params: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A broker that refuses the publish (a fake, beside the real submits above).
    from deepe_tasks.core import broker
    from deepe_tasks.core.errors import BrokerUnavailable
    from deepe_tasks.queue import client as client_module

    def refuse(record: Any) -> None:
        raise ConnectionError("broker refused the publish")

    monkeypatch.setattr(broker, "enqueue", refuse)
    with pytest.raises(BrokerUnavailable, match="could not be queued: broker refused the publish") as info:
        submit("sft-demo", sft_params, queue="refused-q", job_id="unsent-1")
    record = client_module.Job("unsent-1").info()
    assert record["status"] == "failed" and "submit it again" in record["error"]
    assert "submit it again" in str(info.value)
