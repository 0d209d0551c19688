"""DeepExtension custom methods, run unchanged: recognising one, and the command line it expects.

Such a file reads its parameters with argparse (`--model_path=…`), imports `TrainCallback`,
`write_log` and its enums from a `train_callback` module, and keeps `trainer.train()` and the
saves in a `training()` function behind the main guard. deepe gives it the arguments (with
`train_id`, `seq` and `model_name`), provides `train_callback` (`deepe_tasks.job.deepext_shim`),
and never calls `training()`: the platform trains, resumes, cancels and saves.
"""

from __future__ import annotations

import ast
import functools
from typing import Any

from deepe_tasks.contract.params import snake_case
from deepe_tasks.contract.parsing import CACHED, parse
from deepe_tasks.core.errors import InvalidParams

CALLBACK_MODULE = "train_callback"
TRAINING_FUNCTION = "training"
# Flags whose names are not the snake case of the platform parameter they carry.
RENAMED = {"PromptInputColumn": "input_train_name", "PromptOutputColumn": "output_train_name"}


def is_deepextension(source: str) -> bool:
    """A file that imports DeepExtension's `train_callback` module."""
    try:
        return _imports_callback(source)
    except SyntaxError:
        return False


# Submit asks twice (the static check, then admission) and the job process twice: the walk of
# the whole tree is made once per source.
@functools.lru_cache(maxsize=CACHED)
def _imports_callback(source: str) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == CALLBACK_MODULE
               or isinstance(n, ast.Import) and any(a.name == CALLBACK_MODULE for a in n.names)
               for n in ast.walk(parse(source)))


def _flags(source: str) -> dict[str, bool]:
    """The file's `--flag` arguments: {flag: required and without a default}."""
    out: dict[str, bool] = {}
    for node in ast.walk(parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            kw = {k.arg: k.value for k in node.keywords}
            flag = kw.get("required")
            required = isinstance(flag, ast.Constant) and flag.value is True
            for name in names:
                if name.startswith("--"):
                    out[name[2:]] = required and "default" not in kw
    return out


def flag_name(param: str) -> str:
    """MODEL_PATH → model_path, PromptInputColumn → input_train_name, a custom key as it is."""
    return RENAMED.get(param) or snake_case(param)


def _text(value: Any) -> str:
    # argparse's `type=bool` reads any non-empty string as True: false must be the empty string.
    if isinstance(value, bool):
        return "True" if value else ""
    return str(value)


def arguments(source: str, params: dict[str, Any], *, job_id: str, attempt: int) -> list[str]:
    """The `--flag=value` arguments for the flags the file declares, as DeepExtension passes them.

    Raises InvalidParams when a flag the file requires has no value.
    """
    flags = _flags(source)
    values: dict[str, Any] = {flag_name(k): v for k, v in params.items() if v is not None}
    values.update(train_id=job_id, seq=attempt, model_name=str(params.get("OUTPUT_DIR") or job_id).rstrip("/")
                  .rsplit("/", 1)[-1])
    missing = [f for f, required in flags.items() if required and f not in values]
    if missing:
        wanted = [next((p for p in RENAMED if RENAMED[p] == f), f.upper()) for f in missing]
        raise InvalidParams("This DeepExtension method requires " + ", ".join(f"--{f}" for f in missing)
                            + "; give " + ", ".join(wanted) + ".")
    return [f"--{f}={_text(values[f])}" for f in flags if f in values]
