"""The trainer callback handed to every method: trainer events in, deepe events out."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from deepe_tasks.core.records import Event, EventKind, StopReason
from deepe_tasks.core.storage import CHECKPOINT_DONE

Emit = Callable[[Event], None]
# Why a run should stop now; None to go on.
StopCheck = Callable[[], StopReason | None]


class TrainingComplete(Exception):
    """Raised when a resume starts from a checkpoint taken at the last step: nothing is left to
    train (the trainer would otherwise take one step more than MAX_STEPS)."""


class DeepeCallback(TrainerCallback):
    """Turns ``on_log`` and friends into events; checkpoints on a timer; stops when asked.

    A stop happens at a step boundary and always saves a checkpoint first. In a job of several
    ranks, rank 0 decides (its clock, its cancel flag, its signals) and every rank follows at the
    same step: a stop or a checkpoint that one rank skipped would leave the others waiting in a
    collective.
    """

    def __init__(self, job_id: str, emit: Emit, should_stop: StopCheck | None = None,
                 checkpoint_minutes: float | None = None, world_size: int = 1) -> None:
        self.job_id = job_id
        self.world_size = world_size
        self.emit = emit
        self.should_stop = should_stop
        self.checkpoint_s = checkpoint_minutes * 60 if checkpoint_minutes else None
        self.stop_reason: StopReason | None = None
        self.last_metrics: dict[str, Any] = {}
        self._t0: float | None = None
        self._step0 = 0
        self._last_checkpoint = time.monotonic()
        self.last_eval: dict[str, Any] = {}  # the newest evaluation's metrics, with its step
        self.keep_best = False  # KEEP_BEST: checkpoint each evaluation that is the best so far
        # Told of each complete checkpoint (its marker written): an object store uploads it.
        self.on_checkpoint: Callable[[Path], None] | None = None

    def _eta(self, state: TrainerState) -> float | None:
        if self._t0 is None or not state.max_steps:
            return None
        done = state.global_step - self._step0
        if done <= 0:
            return None
        return (time.monotonic() - self._t0) / done * max(state.max_steps - state.global_step, 0)

    def _event(self, kind: EventKind, state: TrainerState, **kw: Any) -> None:
        self.emit(Event(kind=kind, job=self.job_id, step=state.global_step,
                        max_steps=state.max_steps, eta_s=self._eta(state), **kw))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        if 0 < state.max_steps <= state.global_step:
            raise TrainingComplete(f"the checkpoint is at step {state.global_step} of {state.max_steps}")
        self._t0 = time.monotonic()
        self._step0 = state.global_step
        self._last_checkpoint = self._t0

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        metrics = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float, str, bool))}
        if "eval_loss" in metrics:  # the trainer's evaluation on the held-out data
            loss = metrics["eval_loss"]
            if isinstance(loss, (int, float)) and not isinstance(loss, bool):
                metrics["perplexity"] = math.exp(min(float(loss), 700.0))
            self.last_eval = {"step": state.global_step, **metrics}
            if self.keep_best and isinstance(loss, (int, float)) and (state.best_metric is None
                                                                       or loss < state.best_metric):
                # KEEP_BEST: a checkpoint at this step, which the trainer's rotation then keeps
                state.best_metric = float(loss)
                state.best_model_checkpoint = str(Path(args.output_dir or ".") / f"checkpoint-{state.global_step}")
                control.should_save = True
            self._event(EventKind.EVAL, state, metrics=metrics)
            return
        self.last_metrics.update(metrics)
        self._event(EventKind.LOG, state, metrics=metrics)

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        save = self.checkpoint_s is not None and time.monotonic() - self._last_checkpoint >= self.checkpoint_s
        reason = self.should_stop() if self.should_stop is not None else None  # cheap: see stops.StopFlags
        if self.world_size > 1:
            save, reason = _agree(args, save, reason)
        if save:
            control.should_save = True
        if reason:
            self.stop_reason = reason
            control.should_save = True  # whoever resumes or inspects it starts from here
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState,
                control: TrainerControl, **kwargs: Any) -> None:
        self._last_checkpoint = time.monotonic()
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank has written its part (its RNG state) of the checkpoint
            if not state.is_world_process_zero:
                return
        # The trainer calls this once the checkpoint is written whole: only a checkpoint with
        # this mark is ever resumed from.
        folder = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            (folder / CHECKPOINT_DONE).write_text(json.dumps({"job": self.job_id, "step": state.global_step}))
            if self.on_checkpoint is not None:
                self.on_checkpoint(folder)
        self._event(EventKind.CHECKPOINT, state, message=f"checkpoint at step {state.global_step}")


_REASONS = [None, *StopReason]


def _agree(args: TrainingArguments, save: bool, reason: StopReason | None) -> tuple[bool, StopReason | None]:
    """Rank 0's checkpoint and stop decision, on every rank (one small broadcast per step)."""
    import torch
    import torch.distributed as dist

    decision = torch.tensor([int(save), _REASONS.index(reason)], dtype=torch.int64, device=args.device)
    dist.broadcast(decision, src=0)
    saved, code = (int(x) for x in decision.tolist())
    return bool(saved), _REASONS[code]
