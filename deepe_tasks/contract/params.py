"""The parameter schema of the method contract, and its validation at submit."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import (
    AliasChoices,
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.storage import MANIFEST
from deepe_tasks.core.validate import path_text, shown

MAX_PARAMS_BYTES = 1_000_000
MAX_COUNT = 10**9  # steps, warm-up steps, samples: far beyond any run, far below an overflow
MAX_PATH = 4096  # characters in a path (PATH_MAX)
MAX_COLUMN = 1024  # characters in a column name
NEAR_MISS_LENGTH = 64  # a key longer than this is never a misspelt parameter name
NEAR_MISS_EDITS = 2  # a key this many edits from a known name is a typo of it


def snake_case(name: str) -> str:
    """MODEL_PATH → model_path, PromptInputColumn → prompt_input_column."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower() if not name.isupper() else name.lower()


def _field(default: Any, allowed: str, **kw: Any) -> Any:
    """A parameter field: its own name, a snake-case alias, and a description of what is allowed."""
    return Field(default, description=allowed, **kw)


class TrainParams(BaseModel):
    """The parameters every method receives, under their own names; unknown keys are kept as custom."""

    # Each field also answers to its lower snake-case name: model_path, prompt_input_column, ...
    model_config = ConfigDict(extra="allow", populate_by_name=True, validate_assignment=True,
                              alias_generator=AliasGenerator(validation_alias=lambda n: AliasChoices(n, snake_case(n))))

    MODEL_PATH: str = _field(..., "a model folder (relative paths resolve under DEEPE_STORAGE)", min_length=1,
                             max_length=MAX_PATH)
    MAX_SEQ_LENGTH: int = _field(1024, "an integer from 8 to 1048576", ge=8, le=1_048_576)
    LORA_RANK: int = _field(16, "an integer from 1 to 1024", ge=1, le=1024)
    LOAD_IN_4BIT: bool = _field(False, "true or false (also 1/0, yes/no)")
    DATASET_PATH: str = _field(..., "a dataset file or folder (relative paths resolve under DEEPE_STORAGE)",
                               min_length=1, max_length=MAX_PATH)
    MAX_INPUT_LENGTH: int = _field(512, "an integer from 1 to 1048576", ge=1, le=1_048_576)
    MAX_CONTENT_LENGTH: int = _field(256, "an integer from 1 to 1048576", ge=1, le=1_048_576)
    MAX_SAMPLES: int = _field(0, "an integer from -1 to 10**9; 0 or -1 keeps every row", ge=-1, le=MAX_COUNT)
    NUM_GENERATIONS: int = _field(4, "an integer from 2 to 256", ge=2, le=256)
    MAX_GRAD_NORM: float = _field(1.0, "a number > 0 and <= 1000", gt=0, le=1000, allow_inf_nan=False)
    OUTPUT_DIR: str | None = _field(None, "a folder inside DEEPE_STORAGE; default models/<job_id>", max_length=MAX_PATH)
    MAX_STEPS: int = _field(-1, "-1 (train by epochs) or an integer from 1 to 10**9", ge=-1, le=MAX_COUNT)
    NUM_EPOCHS: float = _field(1.0, "a number > 0 and <= 10000, used when MAX_STEPS is -1", gt=0, le=10_000,
                               allow_inf_nan=False)
    BATCH_SIZE: int = _field(2, "an integer from 1 to 65536", ge=1, le=65_536)
    GRAD_ACCUM_STEPS: int = _field(1, "an integer from 1 to 65536", ge=1, le=65_536)
    LEARNING_RATE: float = _field(2e-4, "a number > 0 and <= 1", gt=0, le=1, allow_inf_nan=False)
    WARMUP_STEPS: int = _field(0, "an integer from 0 to 10**9", ge=0, le=MAX_COUNT)
    # Validation during training: a held-out file (the training data's columns) or a seeded
    # fraction of the training data; evaluated every EVAL_STEPS steps (unset: 10 times a run).
    EVAL_DATASET_PATH: str | None = _field(None, "a dataset file or folder with the training data's columns",
                                           max_length=MAX_PATH)
    EVAL_SPLIT: float | None = _field(None, "a fraction of the training data above 0 and below 1", gt=0, lt=1,
                                      allow_inf_nan=False)
    EVAL_STEPS: int | None = _field(None, "an integer from 1 to 10**9", ge=1, le=MAX_COUNT)
    # Publish the checkpoint with the lowest eval_loss instead of the last step's.
    KEEP_BEST: bool = _field(False, "true or false (also 1/0, yes/no)")
    # None means "the method's own default" (instruction/output for SFT, question/answer for GRPO).
    PromptInputColumn: str | None = _field(None, "a column name, or empty for the method's default",
                                           max_length=MAX_COLUMN)
    PromptOutputColumn: str | None = _field(None, "a column name, or empty for the method's default",
                                            max_length=MAX_COLUMN)

    @field_validator("MAX_STEPS")
    @classmethod
    def _steps_not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 steps would train nothing")
        return value

    @field_validator("PromptInputColumn", "PromptOutputColumn", "OUTPUT_DIR", "EVAL_DATASET_PATH", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.as_dict().get(key, default)

    @property
    def custom(self) -> dict[str, Any]:
        """The extra keys that are not part of the schema, for custom methods."""
        return dict(self.model_extra or {})

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=False)


ALIASES = {snake_case(name): name for name in TrainParams.model_fields}


def _allowed(name: str) -> str:
    info = TrainParams.model_fields.get(name)
    return info.description or "" if info else ""


def _plain(key: str) -> str:
    return re.sub(r"[\s_\-]", "", key).lower()


def _edits(a: str, b: str) -> int:
    """About the edit distance of two names, from difflib's opcodes (each changed block
    costs its longer side)."""
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")


def near_miss(key: str, names: list[str]) -> str | None:
    """The known name that ``key`` almost is (case, '_' or '-', up to two typos); None if none.

    A key longer than any name could be is no near miss, so a 1 MB key costs nothing."""
    if len(key) > NEAR_MISS_LENGTH:
        return None
    plain = _plain(key)
    same = [n for n in names if _plain(n) == plain]
    if same:
        return same[0]
    if len(plain) < 4:
        return None
    close = sorted((_edits(plain, _plain(n)), n) for n in names
                   if abs(len(_plain(n)) - len(plain)) <= NEAR_MISS_EDITS)
    return close[0][1] if close and close[0][0] <= NEAR_MISS_EDITS else None


def refuse_near_misses(raw: dict[str, Any], declared: list[str]) -> list[str]:
    """Refuse keys that look like a misspelt known parameter; return the other unknown keys,
    which reach the method as custom parameters."""
    known = [*TrainParams.model_fields, *declared]
    custom, wrong = [], []
    for key in raw:
        if key in known or key in ALIASES:
            continue
        meant = near_miss(key, known)
        if meant is not None:
            wrong.append(f"{key!r} is not a parameter: did you mean {meant}?")
        else:
            custom.append(key)
    if wrong:
        raise InvalidParams(" ".join(wrong) + " (Fix the name, or declare it in the method's METHOD_PARAMS; a key that "
                                              "is no parameter's near miss is passed to the method as a custom "
                                              "parameter.)")
    return custom


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        name = str(e["loc"][0]) if e["loc"] else "params"
        canonical = ALIASES.get(name, name)
        if e["type"] == "missing":
            lines.append(f"{canonical} is required: give {_allowed(canonical)}.")
            continue
        reason = e["msg"].removeprefix("Value error, ")
        lines.append(f"{canonical}={shown(e.get('input'))} is not valid ({reason}); allowed: {_allowed(canonical)}.")
    return " ".join(lines)


def parse_params(raw: dict[str, Any]) -> TrainParams:
    """Validate raw parameters (strings from a UI or the CLI are converted)."""
    if not isinstance(raw, dict):
        raise InvalidParams(f"Parameters must be an object of KEY: value, not {type(raw).__name__}.")
    try:
        size = len(json.dumps(raw))
    except (TypeError, ValueError) as e:
        raise InvalidParams(f"Parameters must be plain JSON values: {e}.") from e
    if size > MAX_PARAMS_BYTES:
        raise InvalidParams(
            f"Parameters are {size} bytes, over the limit of {MAX_PARAMS_BYTES}; "
            "put large data in a file under DEEPE_STORAGE and pass its path."
        )
    try:
        return TrainParams.model_validate(raw)
    except ValidationError as e:
        raise InvalidParams(_format_errors(e)) from e


def _under(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return (path if path.is_absolute() else root / path).resolve()


def resolve_params(params: TrainParams, storage_root: Path, job_id: str) -> TrainParams:
    """Resolve paths against the storage root; OUTPUT_DIR must stay inside it."""
    for name in ("MODEL_PATH", "DATASET_PATH", "EVAL_DATASET_PATH", "OUTPUT_DIR"):
        value = getattr(params, name)
        if value is not None:
            path_text(value, name)  # before the file system sees it: ENAMETOOLONG is no answer
    out = params.model_copy()
    out.MODEL_PATH = str(_under(storage_root, params.MODEL_PATH))
    out.DATASET_PATH = str(_under(storage_root, params.DATASET_PATH))
    if params.EVAL_DATASET_PATH is not None:
        out.EVAL_DATASET_PATH = str(_under(storage_root, params.EVAL_DATASET_PATH))
    output = _under(storage_root, params.OUTPUT_DIR or f"models/{job_id}")
    if output == storage_root or not output.is_relative_to(storage_root):
        raise InvalidParams(
            f"OUTPUT_DIR={params.OUTPUT_DIR!r} resolves to {output}, outside the storage root "
            f"{storage_root}; give a relative path such as 'models/my-run'."
        )
    jobs, models = storage_root / "jobs", storage_root / "models"
    if output.is_relative_to(jobs) or jobs.is_relative_to(output) or models.is_relative_to(output):
        raise InvalidParams(
            f"OUTPUT_DIR={params.OUTPUT_DIR!r} would replace or sit in a folder the platform uses "
            "(jobs/, or all of models/); give a folder of its own, such as 'models/my-run'."
        )
    if output.exists() and not output.is_dir():
        raise InvalidParams(
            f"OUTPUT_DIR={params.OUTPUT_DIR!r} ({output}) is a file; the model is published as a folder "
            "there, so give a new folder, such as 'models/my-run'."
        )
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).exists():
        raise InvalidParams(
            f"OUTPUT_DIR={params.OUTPUT_DIR!r} ({output}) already holds files that are not a deepe model; "
            "a published model replaces its folder, so give an empty or new folder."
        )
    out.OUTPUT_DIR = str(output)
    return out
