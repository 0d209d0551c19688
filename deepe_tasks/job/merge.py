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
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepe_tasks.core import validate
from deepe_tasks.core.errors import AttemptFenced, InvalidParams
from deepe_tasks.core.fences import AlreadyPublished
from deepe_tasks.core.records import MERGE_METHOD, JobSpec, JobStatus, Phase, RunResult, StopReason
from deepe_tasks.core.storage import MANIFEST
from deepe_tasks.job import phases, remote
from deepe_tasks.job.callback import Emit, StopCheck
from deepe_tasks.job.phases import describe
from deepe_tasks.job.publish import publish_model

log = logging.getLogger(__name__)

MERGE_ELSEWHERE = "Move that folder away, then merge again."


class Stopped(Exception):
    """The merge was asked to stop; ``result`` is how its attempt ends."""

    def __init__(self, result: RunResult) -> None:
        super().__init__(result.error)
        self.result = result


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
    """Runs one attempt of a merge job; the same interface as ``runner.Runner`` for jobproc.

    ``should_stop`` (stops.StopFlags) is read before each heavy step and right before the
    rename: a cancelled merge publishes nothing and ends cancelled.
    """

    collective_save = False  # what jobproc reads of a Runner: a merge has one process

    def __init__(self, spec: JobSpec, emit: Emit, should_stop: StopCheck | None = None,
                 may_publish: Callable[[], bool] | None = None, rank: int = 0) -> None:
        self.spec = spec
        self.emit = emit
        self.should_stop = should_stop
        self.may_publish = may_publish
        self.stopped = False  # the result is an agreed stop (a cancel, a shutdown, ...), not a failure
        self.tracker = phases.PhaseTracker(spec.job_id, emit)
        self.base = Path(spec.params["MODEL_PATH"])
        self.adapter = Path(spec.params["ADAPTER_PATH"])
        self.target = Path(spec.params["OUTPUT_DIR"])
        self.merged_from = spec.params.get("MERGED_FROM")
        store = remote.active()  # on an object store, the merged model is published there
        self.published_at = store.output_url if store is not None and store.output_url else str(self.target)

    def run(self) -> RunResult:
        t0 = time.monotonic()
        try:
            self._go_on()
            self.tracker.enter(Phase.BUILDING_MODEL, f"loading {self.base} and the adapter {self.adapter}")
            hashes = {"base_sha256": tree_sha256(self.base), "adapter_sha256": tree_sha256(self.adapter)}
            self._go_on()
            model, tokenizer = self._merged()
            self._go_on()
            self.tracker.enter(Phase.SAVING, f"saving the merged model to {self.target}")
            publish_model(self.spec, self.target, lambda staging: self._stage(model, tokenizer, staging, hashes, t0),
                          self.may_publish, what="merged model", fix=MERGE_ELSEWHERE, before_publish=self._go_on,
                          merged_from=self.merged_from)
        except Stopped as e:
            self.stopped = True
            return e.result.model_copy(update={"phase": self.tracker.phase})
        except AttemptFenced as e:
            return RunResult(status=JobStatus.QUEUED, phase=Phase.SAVING, error=str(e))
        except AlreadyPublished as e:  # another claim of this merge published it (core.fences): it stands
            log.warning("%s", e)
            return RunResult(status=JobStatus.SUCCEEDED, phase=Phase.SAVING, output_dir=self.published_at)
        except InvalidParams as e:  # OUTPUT_DIR holds another job's model, or leads outside the storage
            return RunResult(status=JobStatus.FAILED, phase=self.tracker.phase,
                             error=f"Failed while {self.tracker.phase}: {e}")
        except Exception as e:
            log.exception("the merge failed")
            return RunResult(status=JobStatus.FAILED, phase=self.tracker.phase,
                             error=describe(e, self.tracker.phase, "the merge"))
        return RunResult(status=JobStatus.SUCCEEDED, phase=Phase.SAVING, output_dir=self.published_at,
                         metrics={"merge_s": round(time.monotonic() - t0, 3)})

    def _go_on(self) -> None:
        """Raise Stopped if the merge was asked to stop: nothing is published after that."""
        reason = self.should_stop() if self.should_stop is not None else None
        if reason is None:
            return
        where = "before its merged model was published; nothing was published"
        if reason in (StopReason.CANCEL, StopReason.CANCEL_SAVE):  # a merge has no partial model to save
            raise Stopped(RunResult(status=JobStatus.CANCELLED, error=f"cancelled {where}"))
        if reason is StopReason.TIME_LIMIT:
            raise Stopped(RunResult(status=JobStatus.FAILED, error=(
                f"time limit of {validate.duration(self.spec.time_limit)} reached {where}. Merge again with a longer time limit."
                if self.spec.time_limit else f"time limit reached {where}")))
        # A shutdown or a worker cut off from Redis: another worker merges again from the start.
        raise Stopped(RunResult(status=JobStatus.QUEUED, error=f"stopped ({reason}) {where}; it starts again"))

    def _stage(self, model: Any, tokenizer: Any, staging: Path, hashes: dict[str, str], t0: float) -> None:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        manifest = {
            "job": self.spec.job_id, "method": MERGE_METHOD, "merged_from": self.merged_from,
            "base": str(self.base), "adapter": str(self.adapter), **hashes,
            "merged_sha256": tree_sha256(staging), "attempt": self.spec.attempt,
            "claim": self.spec.claim, "submitted_at": self.spec.submitted_at,
            "worker": self.spec.worker or socket.gethostname(), "finished_at": time.time(),
            "seconds": round(time.monotonic() - t0, 3),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

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
