"""The trainer callback handed to every method: trainer events in, deepe events out."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .records import Event, EventKind

Emit = Callable[[Event], None]
# The cancel flag lives in Redis; reading it at most this often keeps the step path free of
# round trips on fast steps.
CANCEL_CHECK_INTERVAL = 1.0


class DeepeCallback(TrainerCallback):
    """Turns ``on_log`` and friends into events, and stops training when a cancel is asked."""

    def __init__(self, job_id: str, emit: Emit, should_stop: Callable[[], bool] | None = None) -> None:
        self.job_id = job_id
        self.emit = emit
        self.should_stop = should_stop
        self.stopped = False
        self.last_metrics: dict[str, Any] = {}
        self._t0: float | None = None
        self._step0 = 0
        self._next_check = 0.0

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
        self._t0 = time.monotonic()
        self._step0 = state.global_step

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        metrics = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float, str, bool))}
        self.last_metrics.update(metrics)
        self._event(EventKind.LOG, state, metrics=metrics)

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        if self.should_stop is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CANCEL_CHECK_INTERVAL
        if self.should_stop():
            self.stopped = True
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState,
                control: TrainerControl, **kwargs: Any) -> None:
        self._event(EventKind.CHECKPOINT, state, message=f"checkpoint at step {state.global_step}")
