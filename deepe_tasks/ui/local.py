"""Run a method in this process through the worker's runner: no queue, no Redis.

On an object store (DEEPE_STORAGE=s3://…) it works as a worker's job process does: inputs on the
store are read through the worker-style cache (DEEPE_CACHE_DIR), checkpoints go up as they are
made, and the model is published with the same fenced create of ``deepe.json``."""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepe_tasks.contract.admission import admit
from deepe_tasks.contract.methods import Method, sha256_of
from deepe_tasks.contract.stored import check_store, output_owner, published_files, refuse_taken
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.records import Event, JobSpec, JobStatus, RunResult
from deepe_tasks.core.settings import get_settings
from deepe_tasks.core.storage import MANIFEST, job_dir
from deepe_tasks.ui.display import format_event

if TYPE_CHECKING:
    from deepe_tasks.job.runner import Runner

# The values run_local_train_test_template.py holds until its user fills them in, and what goes there.
PLACEHOLDERS = {
    "your-custom-file.py": "a method name (custom01) or its file (custom01.py)",
    "your-model_path": "a model folder, with config.json",
    "your-dataset_path": "a dataset file or folder (JSON, JSONL, CSV, Parquet)",
    "your-output_dir": "a folder inside DEEPE_STORAGE such as 'models/custom01-test' (or no OUTPUT_DIR at all: "
                       "each run then publishes to its own models/<job id>)",
}


def refuse_placeholders(params: dict[str, Any], method_file: str | None = None) -> None:
    """Refuse the template's placeholders left in: 'your-output_dir' would be a real folder."""
    given = {"METHOD_FILE": method_file, **params}
    left = {k: v for k, v in given.items() if isinstance(v, str) and v in PLACEHOLDERS}
    if left:
        shown = " and ".join(f"{k}={v!r}" for k, v in left.items())
        are = "is still the template's placeholder" if len(left) == 1 else "are still the template's placeholders"
        raise InvalidParams(f"{shown} {are}; give your own in run_local_train_test.py: "
                            + "; ".join(f"{k}: {PLACEHOLDERS[v]}" for k, v in left.items()) + ".")


def local_runner(method_file: Path, params: dict[str, Any], emit: Callable[[Event], None],
                 job_id: str | None = None) -> Runner:
    """A runner for ``method_file`` with ``params``, as a worker's job process would build it."""
    settings = get_settings()
    url = settings.storage_url
    _forget_store()  # a store that an earlier run in this process used is not this run's
    source = method_file.read_text(encoding="utf-8")
    # Unique, or two runs in one second would share (and resume from) each other's checkpoints.
    job_id = job_id or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    method = Method(method_file.stem, method_file, source)
    refuse_placeholders(params)
    if url is not None:
        check_store(url)  # a bucket that is not there or not writable, named before anything is read
    resolved = admit(method, params, settings.storage_root, job_id, check_paths=True, gpu=None,
                     storage_url=url).params
    output = str(resolved.OUTPUT_DIR)
    # Before training, as submit does: an earlier run's model there would refuse this one's at the end.
    refuse_taken(output, settings.storage_root, job_id, url)
    if url is not None and (owner := output_owner(url, output)) is not None:
        raise InvalidParams(f"OUTPUT_DIR {output} already holds a model (of job {owner}), which a store cannot "
                            "replace; choose another OUTPUT_DIR, or delete that model first.")
    from deepe_tasks.job.runner import (
        Runner,  # the training stack loads once the input is known good
    )

    job_dir(settings.storage_root, job_id).mkdir(parents=True, exist_ok=True)
    spec = JobSpec(job_id=job_id, method=method_file.stem, method_sha256=sha256_of(source), source=source,
                   params=resolved.as_dict(), storage_root=str(settings.storage_root), worker="local")
    if url is not None:
        from deepe_tasks.job import remote

        # Inputs fetched through the worker-style cache; the model published by the fenced create.
        spec = remote.start(spec.model_copy(update={
            "storage_url": url, "cache_dir": str(settings.cache_dir.expanduser()), "cache_gb": settings.cache_gb,
            "claim": f"local:{job_id}:{uuid.uuid4().hex[:8]}", "submitted_at": time.time()}))
    return Runner(spec, emit)


def _forget_store() -> None:
    """No store for the next runner in this process until ``remote.start`` makes one."""
    from deepe_tasks.job import remote

    remote.forget()


def run_method_file(method_file: Path, params: dict[str, Any], emit: Callable[[Event], None],
                    job_id: str | None = None) -> RunResult:
    """Run ``method_file`` once with ``params``; events go to ``emit``."""
    runner = local_runner(method_file, params, emit, job_id)
    try:
        return runner.run()
    finally:
        from deepe_tasks.job import remote

        store = remote.active()
        if store is not None:  # on a store: its checkpoint uploads finished, as a job process's end does
            store.end()
        _forget_store()


def check_output(output_dir: Path) -> list[str]:
    """What a published model folder lacks: weights, tokenizer or manifest."""
    return _lacks({p.name for p in output_dir.iterdir()} if output_dir.is_dir() else set())


def check_stored_output(url: str, storage_url: str | None) -> list[str]:
    """What the model published at ``url`` on the store lacks (its files are under the key its
    deepe.json names)."""
    found = published_files(url, storage_url)
    return _lacks(set() if found is None else {MANIFEST, *(name.split("/")[0] for name in found[1])})


def _lacks(names: set[str]) -> list[str]:
    problems = []
    if not names & {"model.safetensors", "adapter_model.safetensors", "pytorch_model.bin",
                    "model.safetensors.index.json", "adapter_model.bin"}:
        problems.append("no model weights")
    if not names & {"tokenizer.json", "tokenizer_config.json"}:
        problems.append("no tokenizer")
    if MANIFEST not in names:
        problems.append(f"no {MANIFEST}")
    return problems


def run_local(method_file: str | Path, params: dict[str, Any], echo: Callable[[str], None] = print,
              verbose: bool = False) -> int:
    """Run a method locally, print its events, check what it wrote; 0 if it all worked.

    One line per event; the runner's tracebacks (the worker's output.log has them) only with
    ``verbose``: the FAILED line already names the phase, the error and the method's line.
    """
    if not verbose:
        for name in ("deepe_tasks.job.runner", "deepe_tasks.job.method"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        # The libraries' progress bars (loading weights, each dataset pass) say nothing the
        # events do not: they come back with --verbose.
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = run_method_file(Path(method_file), params, lambda e: echo(format_event(e)))
    if result.status is not JobStatus.SUCCEEDED:
        echo(f"FAILED: {result.error}")
        return 1
    output = result.output_dir or ""
    url = get_settings().storage_url
    problems = check_stored_output(output, url) if url is not None else check_output(Path(output))
    if problems:
        echo(f"FAILED: {result.output_dir} has " + ", ".join(problems))
        return 1
    echo(f"OK: the model, the tokenizer and {MANIFEST} are in {result.output_dir}")
    return 0


def find_method_file(ref: str, beside: Path | None = None) -> Path:
    """A method by name (`custom01`, `sft-demo`) or by file (`custom01.py`, a path): tried as
    given, beside ``beside`` (the calling script), then in the method store and the built-ins."""
    from deepe_tasks.contract.methods import load_method
    from deepe_tasks.core.errors import MethodNotFound

    name = Path(ref)
    candidates = [name] if name.suffix == ".py" else []
    if name.suffix == ".py" and not name.is_absolute() and beside is not None:
        candidates.append(beside.parent / name)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    try:
        return load_method(get_settings().method_root, name.stem).path
    except MethodNotFound as e:
        looked = ", ".join(str(c.resolve()) for c in candidates)
        raise MethodNotFound(f"There is no method file {ref!r}" + (f" (looked at {looked})" if looked else "")
                             + f". {e}") from None


def run_local_script(ref: str, params: dict[str, Any], script: str) -> int:
    """What run_local_train_test.py runs: the method named by ``ref``. A wrong method or parameter,
    or a placeholder left in, is one `FAILED:` line on stderr, not a traceback (exit 2), as in
    `deepe run-local`."""
    from deepe_tasks.core.errors import DeepeError

    try:
        refuse_placeholders(params, ref)
        return run_local(find_method_file(ref, Path(script).resolve()), params)
    except DeepeError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 2
