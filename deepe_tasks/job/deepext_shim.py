"""The `train_callback` module a DeepExtension method imports, provided by deepe.

`TrainCallback(...)` is the platform's callback, so `callbacks=[callback]` attaches it;
`write_log(level, log, details, train_id, seq, data)` becomes deepe events: the phase logs
announce deepe's phases, the others are `log` events with their numbers as metrics.

Its arguments: each parser the file parses gets, in the flags it declares (any spelling, made in
a loop or not), the parameter each flag names, as DeepExtension passes them (`--flag=value`).
A required flag that nothing fills, or a parameter given that no flag takes, is refused with a
sentence that names it, before the file goes on: never argparse's `sys.exit(2)`, never a
parameter silently dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
from collections.abc import Iterator, Sequence
from enum import Enum, auto
from typing import Any, NoReturn

from deepe_tasks.contract import deepext
from deepe_tasks.contract.deepext import CALLBACK_MODULE
from deepe_tasks.core.errors import InvalidParams
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


# What is patched while a DeepExtension file runs: every parser's parse, and its error while we parse.
PARSE, ERROR = "parse_known_args", "error"


class Arguments:
    """The job's parameters, given to each argument parser the file parses, in the flags that
    parser declares (read from the parser itself, so flags made in a loop count too)."""

    def __init__(self, source: str, params: dict[str, Any], *, job_id: str, attempt: int, filename: str) -> None:
        self.source = source
        self.filename = filename
        self.values = deepext.values(params, job_id=job_id, attempt=attempt)
        self.given = deepext.given(params, source)
        self.command_line = deepext.command_line(params, job_id=job_id, attempt=attempt)
        self.taken: set[str] = set()
        self.flags: list[str] = []

    def for_parser(self, parser: argparse.ArgumentParser) -> list[str]:
        """The arguments for ``parser``. Raises InvalidParams for a required flag that no parameter
        fills, and for a parameter given that no flag takes and the file does not read otherwise."""
        argv: list[str] = []
        positional: list[str] = []
        missing: list[str] = []
        # argparse keeps a parser's arguments in `_actions`; it has no public way to list them.
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            flag = _shown(action)
            if flag not in self.flags:
                self.flags.append(flag)
            key = deepext.param_for([*action.option_strings, action.dest], self.values)
            if key is None:
                if action.required or (not action.option_strings and action.nargs not in ("?", "*")):
                    missing.append(flag)
                continue
            self.taken.add(key)
            (argv if action.option_strings else positional).extend(_argv(action, flag, self.values[key]))
        if missing:
            raise InvalidParams(deepext.missing_message(missing))
        unread = {k: v for k, v in self.given.items()
                  if k not in self.taken and k not in deepext.read_directly(self.source)}
        if unread:
            raise InvalidParams(deepext.unread_message(self.filename, unread, self.flags))
        return argv + positional


def _shown(action: argparse.Action) -> str:
    """A flag's name as written: its long option, else its first, else (a positional) its dest."""
    long = [o for o in action.option_strings if len(o) > 2 and o[1] == o[0]]
    return (long or action.option_strings or [action.dest])[0]


def _truthy(value: Any) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on") if isinstance(value, str) else bool(value)


def _argv(action: argparse.Action, flag: str, value: Any) -> list[str]:
    """``value`` as the arguments ``action`` reads: a switch is there or not, a list is its items."""
    if isinstance(action, argparse.BooleanOptionalAction):
        off = [o for o in action.option_strings if o.startswith("--no-")]
        return [flag] if _truthy(value) or not off else [off[0]]
    if action.nargs == 0:  # store_true, store_false, store_const, count
        wanted = not _truthy(value) if isinstance(action, argparse._StoreFalseAction) else _truthy(value)
        return [flag] if wanted else []
    items = [deepext.text(v) for v in value] if isinstance(value, (list, tuple)) else [deepext.text(value)]
    if not action.option_strings:
        return items
    if isinstance(action, argparse._AppendAction):
        return [f"{flag}={item}" for item in items]
    if action.nargs in (None, "?"):
        return [f"{flag}={deepext.text(value)}"]
    return [flag, *items]


@contextlib.contextmanager
def installed(shim: types.ModuleType, arguments: Arguments) -> Iterator[None]:
    """While the file runs: `import train_callback` finds the shim, `sys.argv` holds every parameter
    as DeepExtension passes them, and each parser it parses gets the arguments it declares."""
    saved_argv, saved_module = sys.argv, sys.modules.get(CALLBACK_MODULE)
    original = argparse.ArgumentParser.parse_known_args
    sys.argv = [arguments.filename, *arguments.command_line]

    def parse_known_args(parser: argparse.ArgumentParser, args: Sequence[str] | None = None,
                         namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        if args is not None and list(args) != sys.argv[1:] or not _called_from(arguments.filename):
            return original(parser, args, namespace)  # the file's own arguments, or a library's parser
        mine = arguments.for_parser(parser)
        with _refusing(parser):
            return original(parser, mine, namespace)

    sys.modules[CALLBACK_MODULE] = shim
    setattr(argparse.ArgumentParser, PARSE, parse_known_args)
    try:
        yield
    finally:
        setattr(argparse.ArgumentParser, PARSE, original)
        sys.argv = saved_argv
        if saved_module is None:
            sys.modules.pop(CALLBACK_MODULE, None)
        else:
            sys.modules[CALLBACK_MODULE] = saved_module


def _called_from(filename: str) -> bool:
    """Whether the method's file (compiled under ``filename``) is a caller of this parse."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == filename:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


@contextlib.contextmanager
def _refusing(parser: argparse.ArgumentParser) -> Iterator[None]:
    """argparse's own refusal (a value its `type` rejects) as a sentence, not `sys.exit(2)`."""

    def error(message: str) -> NoReturn:
        raise InvalidParams(f"The file's argument parser refused the job's parameters: {message}. Give a value "
                            "of the type that flag declares.")

    setattr(parser, ERROR, error)
    try:
        yield
    finally:
        vars(parser).pop(ERROR, None)
