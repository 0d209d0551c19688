"""Which phase a method is in while its source runs (seen through the library calls it makes),
and a failure in that phase told as a sentence with a hint."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from deepe_tasks.core.records import Event, EventKind, Phase


class PhaseTracker:
    """Follows the method's calls into transformers and datasets to name its current phase."""

    def __init__(self, job_id: str, emit: Callable[[Event], None]) -> None:
        self.job_id = job_id
        self.emit = emit
        self.phase = Phase.LOADING_METHOD
        self._announced: set[EventKind] = set()

    def enter(self, phase: Phase, message: str = "") -> None:
        """Now in ``phase``; its event goes out the first time (a tokenizer after the model does not repeat it)."""
        self.phase = phase
        kind = phase.event
        if kind is not None and kind not in self._announced:
            self._announced.add(kind)
            self.emit(Event(kind=kind, job=self.job_id, message=message or phase.value))

    def _wrap(self, fn: Callable[..., Any], phase: Phase) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.enter(phase)
            return fn(*args, **kwargs)

        return wrapper

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Patch the library entry points for the time the method source runs."""
        import datasets
        import transformers
        from transformers import PreTrainedModel, PreTrainedTokenizerBase

        patches: list[tuple[Any, str, Any]] = []

        def patch(owner: Any, name: str, phase: Phase, classmethod_: bool = False) -> None:
            original = owner.__dict__[name]
            if classmethod_:
                wrapped: Any = classmethod(self._wrap(original.__func__, phase))
            else:
                wrapped = self._wrap(original, phase)
            patches.append((owner, name, original))
            setattr(owner, name, wrapped)

        patch(PreTrainedModel, "from_pretrained", Phase.BUILDING_MODEL, classmethod_=True)
        patch(PreTrainedTokenizerBase, "from_pretrained", Phase.BUILDING_MODEL, classmethod_=True)
        patch(transformers.Trainer, "__init__", Phase.BUILDING_TRAINER)
        for module in (datasets, datasets.load):
            for name in ("load_dataset", "load_from_disk"):
                if name in module.__dict__:
                    patch(module, name, Phase.LOADING_DATASET)
        try:
            yield
        finally:
            for owner, name, original in reversed(patches):
                setattr(owner, name, original)


# The method's own line where the error surfaced says more about the phase than the last
# library call does: `raise ValueError("the dataset has no column ...")`, `args=SFTConfig(...)`.
_LINE_HINTS = (
    (Phase.BUILDING_TRAINER, ("Trainer(", "Config(", "peft_config")),
    (Phase.LOADING_DATASET, ("dataset", "DATASET_PATH", "column", "load_dataset")),
    (Phase.BUILDING_MODEL, ("MODEL_PATH", "LOAD_IN_4BIT", "model", "tokenizer")),
)


def refine(phase: Phase, line: str) -> Phase:
    for candidate, words in _LINE_HINTS:
        if any(w in line for w in words):
            return candidate
    return phase


class PhaseFailure(Exception):
    """The method failed in ``phase``; the message is the sentence the user reads."""

    def __init__(self, phase: Phase, message: str) -> None:
        super().__init__(message)
        self.phase = phase


def _hint(exc: BaseException, phase: Phase) -> str:
    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, ImportError):
        return "Install that package on the workers, or remove the import from the method."
    if isinstance(exc, MemoryError) or "out of memory" in text.lower() or name == "OutOfMemoryError":
        return "Lower BATCH_SIZE or MAX_SEQ_LENGTH, raise GRAD_ACCUM_STEPS, or set LOAD_IN_4BIT=true."
    if isinstance(exc, FileNotFoundError) and phase is Phase.LOADING_DATASET:
        return "Check DATASET_PATH: relative paths resolve under DEEPE_STORAGE."
    if phase is Phase.BUILDING_MODEL and isinstance(exc, (OSError, ValueError)):
        return "Check MODEL_PATH: it must be a complete model folder (config.json and weights)."
    return ""


def describe(exc: BaseException, phase: Phase, filename: str) -> str:
    """A readable sentence: the phase, the error, where in the method, and what to do."""
    where = ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    if frames:
        f = frames[-1]
        where = f" (at {filename} line {f.lineno}: `{(f.line or '').strip()}`)"
    text = str(exc).strip() or "no message"
    hint = _hint(exc, phase)
    return f"Failed while {phase}: {type(exc).__name__}: {text}{where}." + (f" {hint}" if hint else "")


def column_hint(exc: BaseException, namespace: dict[str, Any]) -> str:
    """For a KeyError on a dataset column: which parameter names it, and the columns there are."""
    if not isinstance(exc, KeyError) or not exc.args:
        return ""
    missing = exc.args[0]
    named = [p for p in ("PromptInputColumn", "PromptOutputColumn") if namespace.get(p) == missing]
    columns = next((list(v.column_names) for v in namespace.values()
                    if isinstance(getattr(v, "column_names", None), list)), None)
    if not named and columns is None:
        return ""
    which = f" ({' and '.join(named)})" if named else ""
    there = f"; the dataset's columns are {', '.join(map(str, columns))}" if columns is not None else ""
    return (f" The dataset has no column {missing!r}{which}{there}. Give the right name with "
            "-p PromptInputColumn=… / -p PromptOutputColumn=….")
