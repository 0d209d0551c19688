"""Helpers shared by the tests: a real worker process, the CLI in and out of process, waiting,
and the methods the tests train with. Fixtures are in conftest.py; import these from here."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from deepe_tasks.contract.methods import BEGIN_MARKER, END_MARKER

ROOT = Path(__file__).resolve().parent.parent
SESSION_DIR = Path(tempfile.mkdtemp(prefix="deepe-tests-"))
STORAGE = SESSION_DIR / "storage"
STORE = SESSION_DIR / "method_store"
API_TOKEN = "t0ken-for-in-process-api"


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


# What the repository ships in method_store/: the user's own methods there (README: copy the
# template to custom01.py) are theirs, and no test or check of the project reads them.
SHIPPED_METHOD_FILES = ("custom-template.py", "run_local_train_test_template.py")


def copy_shipped_store(target: Path) -> Path:
    """A method store with only what the repository ships in method_store/."""
    target.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_METHOD_FILES:
        shutil.copy2(ROOT / "method_store" / name, target / name)
    return target


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
