"""Which phase a method is in while its source runs, seen through the library calls it makes."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from deepe_tasks.core.records import Event, EventKind

LOADING_METHOD = "loading the method"
BUILDING_MODEL = "building the model"
LOADING_DATASET = "loading the dataset"
BUILDING_TRAINER = "building the trainer"
TRAINING = "training"
SAVING = "saving"


class PhaseTracker:
    """Follows the method's calls into transformers and datasets to name its current phase."""

    def __init__(self, job_id: str, emit: Callable[[Event], None]) -> None:
        self.job_id = job_id
        self.emit = emit
        self.phase = LOADING_METHOD
        self._announced: set[EventKind] = set()

    def enter(self, phase: str, kind: EventKind | None = None, message: str = "") -> None:
        self.phase = phase
        if kind is not None and kind not in self._announced:
            self._announced.add(kind)
            self.emit(Event(kind=kind, job=self.job_id, message=message or phase))

    def _wrap(self, fn: Callable[..., Any], phase: str, kind: EventKind | None) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.enter(phase, kind)
            return fn(*args, **kwargs)

        return wrapper

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Patch the library entry points for the time the method source runs."""
        import datasets
        import transformers
        from transformers import PreTrainedModel, PreTrainedTokenizerBase

        patches: list[tuple[Any, str, Any]] = []

        def patch(owner: Any, name: str, phase: str, kind: EventKind | None, classmethod_: bool = False) -> None:
            original = owner.__dict__[name]
            if classmethod_:
                wrapped: Any = classmethod(self._wrap(original.__func__, phase, kind))
            else:
                wrapped = self._wrap(original, phase, kind)
            patches.append((owner, name, original))
            setattr(owner, name, wrapped)

        patch(PreTrainedModel, "from_pretrained", BUILDING_MODEL, EventKind.LOADING_MODEL, classmethod_=True)
        patch(PreTrainedTokenizerBase, "from_pretrained", BUILDING_MODEL, EventKind.LOADING_MODEL, classmethod_=True)
        patch(transformers.Trainer, "__init__", BUILDING_TRAINER, None)
        for module in (datasets, datasets.load):
            for name in ("load_dataset", "load_from_disk"):
                if name in module.__dict__:
                    patch(module, name, LOADING_DATASET, EventKind.LOADING_DATASET)
        try:
            yield
        finally:
            for owner, name, original in reversed(patches):
                setattr(owner, name, original)


# The method's own line where the error surfaced says more about the phase than the last
# library call does: `raise ValueError("the dataset has no column ...")`, `args=SFTConfig(...)`.
_LINE_HINTS = (
    (BUILDING_TRAINER, ("Trainer(", "Config(", "peft_config")),
    (LOADING_DATASET, ("dataset", "DATASET_PATH", "column", "load_dataset")),
    (BUILDING_MODEL, ("MODEL_PATH", "LOAD_IN_4BIT", "model", "tokenizer")),
)


def refine(phase: str, line: str) -> str:
    for candidate, words in _LINE_HINTS:
        if any(w in line for w in words):
            return candidate
    return phase
