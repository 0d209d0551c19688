"""The runner: the shared core of the worker's job process and of local test runs.

It executes a method's pinned source with the parameters and the callback injected, checks
the contract, trains, and publishes the model and tokenizer atomically with a manifest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import socket
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from deepe_tasks.contract.params import TrainParams
from deepe_tasks.core import records, validate
from deepe_tasks.core.errors import AttemptFenced, InvalidParams, MethodContractError
from deepe_tasks.core.fences import AlreadyPublished, published_by_another
from deepe_tasks.core.records import JobSpec, JobStatus, Phase, RunResult, StopReason, mask_secrets
from deepe_tasks.core.storage import MANIFEST, attempt_dir, latest_checkpoint
from deepe_tasks.job import evaluation, method, phases, remote
from deepe_tasks.job.callback import DeepeCallback, Emit, StopCheck, TrainingComplete
from deepe_tasks.job.phases import PhaseFailure, describe
from deepe_tasks.job.publish import publish_model

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "deepe-tasks")


def _versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    out["python"] = platform.python_version()
    return out


class Runner:
    """Runs one attempt of one job. ``should_stop`` is read by the callback to honour cancels.

    In a multi-device job every rank runs one; only rank 0's publishes events and saves, and
    the callbacks share rank 0's stop decisions at each step boundary.
    """

    def __init__(self, spec: JobSpec, emit: Emit, should_stop: StopCheck | None = None,
                 may_publish: Callable[[], bool] | None = None, rank: int = 0) -> None:
        self.spec = spec
        self.rank = rank
        self.may_publish = may_publish  # the last check before the model is renamed into place
        self.emit = emit
        self.params = TrainParams.model_validate(spec.params)
        self.filename = f"{spec.method}.py"
        self.callback = DeepeCallback(spec.job_id, emit, should_stop, spec.checkpoint_minutes,
                                      world_size=spec.world_size)
        self.tracker = phases.PhaseTracker(spec.job_id, emit)
        self.namespace: dict[str, Any] = {}
        self.collective_save = False  # every rank takes part in saving the model (FSDP)
        self.stopped = False  # the result is an agreed early stop (cancel, time limit, ...), not a failure
        self.timings: dict[str, float] = {}
        self.best: dict[str, Any] | None = None  # KEEP_BEST: the checkpoint published instead of the last step
        self.checkpoint_dir = attempt_dir(Path(spec.storage_root), spec.job_id, spec.attempt) / "checkpoints"
        self.remote = remote.active()  # on an object store: checkpoints go up as they are made
        if self.remote is not None and rank == 0:
            self.callback.on_checkpoint = self.remote.uploads.checkpoint

    def run(self) -> RunResult:
        t0 = time.monotonic()
        adopted = self._published_by_another()
        if adopted is not None:  # a Redis failover lost that attempt's end: its model stands
            return self._adopt(AlreadyPublished(
                f"attempt {adopted.get('attempt')} of this job (claim {adopted['claim']}) already published its "
                f"model at {self.params.OUTPUT_DIR}; this attempt does not train it again", adopted))
        try:
            trainer = self.build()
            self.timings["load_s"] = round(time.monotonic() - t0, 3)
            t1 = time.monotonic()
            train_metrics = self._train(trainer)
            self.timings["train_s"] = round(time.monotonic() - t1, 3)
        except PhaseFailure as e:
            return self._failed(e.phase, str(e))
        metrics = {**self.callback.last_metrics, **train_metrics}
        step = trainer.state.global_step
        reason = self.callback.stop_reason
        stopped = self._stopped(reason, step)
        if stopped is not None:
            self.stopped = True
            return stopped.model_copy(update={"phase": Phase.TRAINING, "metrics": metrics, "step": step})
        if self.rank != 0:  # rank 0 saves the model that every rank trained
            if self.collective_save:
                self._save_shard(trainer)
            return RunResult(status=JobStatus.SUCCEEDED, phase=Phase.TRAINING, step=step)
        partial = reason is StopReason.CANCEL_SAVE
        try:
            self.best, note = evaluation.keep_best(trainer) if self.params.KEEP_BEST else (None, None)
            if note is not None:
                self.emit(records.Event(kind=records.EventKind.LOG, job=self.spec.job_id, message=note))
            t2 = time.monotonic()
            self.tracker.enter(Phase.SAVING, "saving the model and tokenizer")
            output = self._save(trainer, metrics, save_started=t2, partial=partial)
        except AttemptFenced as e:
            return RunResult(status=JobStatus.QUEUED, phase=Phase.SAVING, metrics=metrics, step=step, error=str(e))
        except AlreadyPublished as e:
            return self._adopt(e)
        except InvalidParams as e:  # OUTPUT_DIR is another job's model, or leads outside the storage
            return self._failed(Phase.SAVING, f"Failed while {Phase.SAVING}: {e}")
        except Exception as e:
            log.exception("saving failed")
            return self._failed(Phase.SAVING, describe(e, Phase.SAVING, self.filename))
        if partial:
            return RunResult(status=JobStatus.CANCELLED, phase=Phase.SAVING, metrics=metrics, step=step,
                             output_dir=self._output(output),
                             error=f"cancelled at step {step}; the partial model was saved")
        return RunResult(status=JobStatus.SUCCEEDED, phase=Phase.SAVING, metrics=metrics,
                         output_dir=self._output(output), step=step)

    def _published_by_another(self) -> dict[str, Any] | None:
        if self.remote is None:
            return published_by_another(Path(self.params.OUTPUT_DIR or "."), self.spec.job_id,
                                        self.spec.submitted_at, self.spec.claim)
        manifest = self.remote.published()
        if manifest is None or manifest.get("job") != self.spec.job_id or not manifest.get("claim") \
                or manifest.get("claim") == self.spec.claim:
            return None
        try:
            return manifest if float(manifest.get("submitted_at")) == float(self.spec.submitted_at) else None  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None

    def _output(self, output: Path) -> str:
        """Where the model is published: OUTPUT_DIR's URL on an object store, else the folder."""
        return self.remote.output_url if self.remote is not None and self.remote.output_url else str(output)

    def _adopt(self, published: AlreadyPublished) -> RunResult:
        """Succeed with the model another claim of this job published (`core.fences`)."""
        log.warning("%s", published)
        self.emit(records.Event(kind=records.EventKind.SAVING, job=self.spec.job_id, message=str(published)))
        manifest = published.manifest
        metrics = {k: v for k, v in (manifest.get("metrics") or {}).items() if isinstance(v, (int, float))}
        return RunResult(status=JobStatus.SUCCEEDED, phase=Phase.SAVING, metrics=metrics,
                         output_dir=self._output(Path(self.params.OUTPUT_DIR or ".")), step=manifest.get("steps"))

    def _stopped(self, reason: StopReason | None, step: int) -> RunResult | None:
        """How an attempt that stopped early ended; None when it goes on to save."""
        if reason is StopReason.CANCEL:
            return RunResult(status=JobStatus.CANCELLED, error=f"cancelled at step {step}")
        if reason is StopReason.PREEMPT:
            return RunResult(status=JobStatus.QUEUED, error=f"stopped at step {step} to be resumed")
        if reason is StopReason.CUT_OFF:
            return RunResult(status=JobStatus.QUEUED, error=(
                f"stopped at step {step}: its worker could not reach Redis for DEEPE_LEASE_TTL="
                f"{self.spec.lease_ttl:g} s"))
        if reason is StopReason.TIME_LIMIT:
            return RunResult(status=JobStatus.FAILED, error=(
                f"time limit of {validate.duration(self.spec.time_limit)} reached at step {step}; the checkpoint is kept "
                "in the job folder. Submit again with a longer time_limit, or fewer MAX_STEPS."
                if self.spec.time_limit else f"time limit reached at step {step}"))
        return None

    def _save_shard(self, trainer: Any) -> None:
        """A rank other than 0 of an FSDP job: give rank 0 this rank's shards as it saves."""
        import torch.distributed as dist

        staging: list[str | None] = [None]
        dist.broadcast_object_list(staging, src=0)
        if staging[0]:
            trainer.save_model(staging[0])

    def build(self) -> Any:
        """Execute the method and check the contract; return its trainer, ready to train."""
        method.inputs_exist(self.spec, self.params)
        self.namespace = method.execute(self.spec, self.params, self.callback, self.tracker, self.emit)
        trainer, self.collective_save = method.check_contract(self.namespace, self.spec, self.callback,
                                                               self.checkpoint_dir)
        self.callback.keep_best = bool(self.params.KEEP_BEST)
        warning = evaluation.schedule(trainer, self.params)
        if warning is not None:
            log.warning("%s", warning)
            self.emit(records.Event(kind=records.EventKind.LOG, job=self.spec.job_id, message=f"warning: {warning}"))
        return trainer

    def _failed(self, phase: Phase, message: str) -> RunResult:
        return RunResult(status=JobStatus.FAILED, phase=phase, error=message)

    def _train(self, trainer: Any) -> dict[str, Any]:
        self.tracker.enter(Phase.TRAINING)
        resume = latest_checkpoint(Path(self.spec.storage_root), self.spec.job_id)
        if resume is not None:
            step = int(resume.name.split("-")[-1])
            self.emit(records.Event(kind=records.EventKind.RESUMED, job=self.spec.job_id, step=step,
                            message=f"resumed from the checkpoint at step {step}"))
        try:
            output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except TrainingComplete:
            return {}  # the model holds the checkpoint's weights: it goes straight to saving
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            log.exception("training failed")
            raise PhaseFailure(Phase.TRAINING, describe(e, Phase.TRAINING, self.filename)) from e
        metrics = {k: v for k, v in (getattr(output, "metrics", None) or {}).items() if isinstance(v, (int, float))}
        steps = trainer.state.global_step
        if steps and "train_runtime" in metrics:
            metrics["step_time_s"] = metrics["train_runtime"] / steps
        import torch

        if torch.cuda.is_available():
            metrics["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return metrics

    def _save(self, trainer: Any, metrics: dict[str, Any], save_started: float, partial: bool = False) -> Path:
        return publish_model(self.spec, Path(self.params.OUTPUT_DIR or "."), may_publish=self.may_publish,
                             write=lambda staging: self._stage(trainer, staging, metrics, save_started, partial))

    def _stage(self, trainer: Any, staging: Path, metrics: dict[str, Any], save_started: float,
               partial: bool) -> None:
        """Write the model, the tokenizer and the manifest into ``staging``."""
        model = self.namespace["model"]
        # The trainer may have wrapped the model (peft, accelerate): save what it trained.
        trained = getattr(trainer, "model", None) or model
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is not None:
            trained = accelerator.unwrap_model(trained)
        if not callable(getattr(trained, "save_pretrained", None)):
            trained = model
        if self.collective_save:
            import torch.distributed as dist

            dist.broadcast_object_list([str(staging)], src=0)  # every rank gives its shards
            trainer.save_model(str(staging))
        else:
            trained.save_pretrained(str(staging))
        if not any(staging.glob("*.safetensors")) and not any(staging.glob("*.bin")):
            raise MethodContractError(
                f"saving wrote no weights into the model folder (only {sorted(p.name for p in staging.iterdir())}); "
                "nothing was published. With FSDP, set fsdp_config={'state_dict_type': 'FULL_STATE_DICT'} so that "
                "the ranks' shards are gathered into one model.")
        self.namespace["tokenizer"].save_pretrained(str(staging))
        self.timings["save_s"] = round(time.monotonic() - save_started, 3)
        manifest = {
            "job": self.spec.job_id,
            "method": self.spec.method,
            "method_sha256": self.spec.method_sha256,
            "attempt": self.spec.attempt,
            "claim": self.spec.claim,  # which claim of the attempt published it (core.fences)
            "submitted_at": self.spec.submitted_at,
            "params": mask_secrets(self.params.as_dict()),
            "metrics": metrics,
            "eval": self.callback.last_eval or None,  # the last evaluation on the held-out data, with its step
            "best": self.best,  # KEEP_BEST: the step published and its eval_loss
            "steps": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "partial": partial,
            "versions": _versions(),
            "worker": self.spec.worker or socket.gethostname(),
            "started_at": self.spec.started_at,
            "finished_at": time.time(),
            "timings": self.timings,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
