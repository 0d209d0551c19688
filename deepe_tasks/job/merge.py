"""A merge job: a finished job's LoRA adapter folded into its base model, published complete.

It runs as any job does (a queue, a worker, a lease, a fenced and atomic publish, resumed by
another worker if its own dies), with the platform's code instead of a method: PEFT's
``merge_and_unload``, then the model and tokenizer saved to a staging folder beside its
OUTPUT_DIR, with a ``deepe.json`` that names the job it was merged from and the hashes of
both sources, renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepe_tasks.core.errors import AttemptFenced
from deepe_tasks.core.records import JobSpec, JobStatus, Phase, RunResult
from deepe_tasks.core.storage import MANIFEST, publish, remove_staging, staging_dir
from deepe_tasks.job import phases
from deepe_tasks.job.callback import Emit
from deepe_tasks.job.phases import describe

log = logging.getLogger(__name__)

METHOD = "merge"  # the method name merge jobs are recorded under (no file: the code is here)


def tree_sha256(folder: Path) -> str:
    """One hash of every file under ``folder``: their relative paths and contents, in order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name == MANIFEST:
            continue  # the manifest names the job, not the weights
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


class MergeRunner:
    """Runs one attempt of a merge job; the same interface as ``runner.Runner`` for jobproc."""

    collective_save = False  # what jobproc reads of a Runner: a merge has one process, and stops only when killed
    stopped = False

    def __init__(self, spec: JobSpec, emit: Emit, should_stop: Any = None,
                 may_publish: Callable[[], bool] | None = None, rank: int = 0) -> None:
        self.spec = spec
        self.emit = emit
        self.may_publish = may_publish
        self.tracker = phases.PhaseTracker(spec.job_id, emit)
        self.base = Path(spec.params["MODEL_PATH"])
        self.adapter = Path(spec.params["ADAPTER_PATH"])
        self.target = Path(spec.params["OUTPUT_DIR"])

    def run(self) -> RunResult:
        t0 = time.monotonic()
        try:
            self.tracker.enter(Phase.BUILDING_MODEL, f"loading {self.base} and the adapter {self.adapter}")
            hashes = {"base_sha256": tree_sha256(self.base), "adapter_sha256": tree_sha256(self.adapter)}
            model, tokenizer = self._merged()
        except Exception as e:
            log.exception("the merge failed")
            return RunResult(status=JobStatus.FAILED, phase=self.tracker.phase,
                             error=describe(e, self.tracker.phase, "the merge"))
        self.tracker.enter(Phase.SAVING, f"saving the merged model to {self.target}")
        staging = staging_dir(self.target, self.spec.job_id, self.spec.attempt)
        try:
            model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
            manifest = {
                "job": self.spec.job_id, "method": METHOD, "merged_from": self.spec.params.get("MERGED_FROM"),
                "base": str(self.base), "adapter": str(self.adapter), **hashes,
                "merged_sha256": tree_sha256(staging), "attempt": self.spec.attempt,
                "worker": self.spec.worker or socket.gethostname(), "finished_at": time.time(),
                "seconds": round(time.monotonic() - t0, 3),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if self.may_publish is not None and not self.may_publish():
                raise AttemptFenced(f"attempt {self.spec.attempt} no longer owns job {self.spec.job_id} (its lease "
                                    "was lost); its merged model was not published")
            publish(staging, self.target)
        except AttemptFenced as e:
            shutil.rmtree(staging, ignore_errors=True)
            return RunResult(status=JobStatus.QUEUED, phase=Phase.SAVING, error=str(e))
        except Exception as e:
            shutil.rmtree(staging, ignore_errors=True)
            log.exception("saving the merged model failed")
            return RunResult(status=JobStatus.FAILED, phase=Phase.SAVING, error=describe(e, Phase.SAVING, "the merge"))
        remove_staging(self.target, self.spec.job_id, range(1, self.spec.attempt))
        return RunResult(status=JobStatus.SUCCEEDED, phase=Phase.SAVING, output_dir=str(self.target),
                         metrics={"merge_s": round(time.monotonic() - t0, 3)})

    def _merged(self) -> tuple[Any, Any]:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # The base in full precision, never 4-bit: a merged model is what gets deployed.
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        base = AutoModelForCausalLM.from_pretrained(str(self.base), dtype=dtype)
        merged = PeftModel.from_pretrained(base, str(self.adapter)).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(str(self.adapter))
        return merged, tokenizer
