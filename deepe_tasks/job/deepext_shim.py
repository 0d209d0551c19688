"""The `train_callback` module a DeepExtension method imports, provided by deepe.

`TrainCallback(...)` is the platform's callback, so `callbacks=[callback]` attaches it;
`write_log(level, log, details, train_id, seq, data)` becomes deepe events: the phase logs
announce deepe's phases, the others are `log` events with their numbers as metrics.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from enum import Enum, auto
from typing import Any

from deepe_tasks.contract.deepext import CALLBACK_MODULE
from deepe_tasks.core.records import Event, EventKind, Phase
from deepe_tasks.job.callback import DeepeCallback, Emit
from deepe_tasks.job.phases import PhaseTracker


class LogEnum(Enum):
    ParamCheckFailed = auto()
    ParamCheckWarning = auto()
    ActualParams = auto()
    TrainingFileNotFound = auto()
    LoadingTrainingFileError = auto()
    InitializingModel = auto()
    HandleWithDataset = auto()
    ConfigTrainingParams = auto()
    StartTraining = auto()
    TrainingSuccess = auto()
    TrainingFailed = auto()
    SaveTrainedModel = auto()
    SaveTrainedModelSuccess = auto()
    Training = auto()


class StatusEnum(Enum):
    PleaseCheck = auto()
    Success = auto()
    Running = auto()
    Failed = auto()
    Warning = auto()
    Unknown = auto()


class LevelEnum(Enum):
    INFO = auto()
    WARNING = auto()
    ERROR = auto()


PHASES = {
    LogEnum.InitializingModel: Phase.BUILDING_MODEL,
    LogEnum.HandleWithDataset: Phase.LOADING_DATASET,
    LogEnum.ConfigTrainingParams: Phase.BUILDING_TRAINER,
    LogEnum.StartTraining: Phase.TRAINING,
    LogEnum.SaveTrainedModel: Phase.SAVING,
}


def module(job_id: str, callback: DeepeCallback, tracker: PhaseTracker, emit: Emit) -> types.ModuleType:
    """A `train_callback` module bound to one run."""

    def train_callback(logging_steps: int = 1, train_id: Any = None, seq: Any = None) -> DeepeCallback:
        return callback

    def write_log(level: LevelEnum, log: LogEnum, details: Any = None, train_id: Any = None, seq: Any = None,
                  data: Any = None) -> None:
        phase = PHASES.get(log)
        message = log.name if details in (None, "") else f"{log.name}: {details}"
        if phase is not None and phase is not tracker.phase:
            tracker.enter(phase, message)
            return
        prefix = "" if level is LevelEnum.INFO else f"{level.name.lower()}: "
        metrics = {k: v for k, v in (data or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)} \
            if isinstance(data, dict) else {}
        emit(Event(kind=EventKind.LOG, job=job_id, message=prefix + message, metrics=metrics))

    shim = types.ModuleType(CALLBACK_MODULE, __doc__)
    shim.__dict__.update(TrainCallback=train_callback, write_log=write_log, LogEnum=LogEnum,
                         StatusEnum=StatusEnum, LevelEnum=LevelEnum)
    return shim


@contextlib.contextmanager
def installed(shim: types.ModuleType, argv: list[str]) -> Iterator[None]:
    """`import train_callback` finds the shim and argparse reads ``argv`` while the file runs."""
    saved_argv, saved_module = sys.argv, sys.modules.get(CALLBACK_MODULE)
    sys.argv, sys.modules[CALLBACK_MODULE] = argv, shim
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_module is None:
            sys.modules.pop(CALLBACK_MODULE, None)
        else:
            sys.modules[CALLBACK_MODULE] = saved_module
