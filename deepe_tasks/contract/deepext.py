"""DeepExtension custom methods, run unchanged: recognising one, and which parameter each of its
flags takes.

Such a file reads its parameters with argparse (`--model_path=…`), imports `TrainCallback`,
`write_log` and its enums from a `train_callback` module, and keeps `trainer.train()` and the
saves in a `training()` function behind the main guard. deepe gives it the arguments (with
`train_id`, `seq` and `model_name`), provides `train_callback` (`deepe_tasks.job.deepext_shim`),
and never calls `training()`: the platform trains, resumes, cancels and saves.

A flag takes the parameter whose name it spells, whatever the case and the `-` or `_`
(`--model_path`, `--MODEL_PATH`, `--model-path` all take MODEL_PATH). The job process reads the
flags from the parser itself when the file parses them (`job/deepext_shim.py`); submit reads the
`add_argument` calls it can see, to refuse a required flag that nothing would fill.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterable
from typing import Any

from deepe_tasks.contract.declared import declared_params
from deepe_tasks.contract.params import TrainParams, snake_case
from deepe_tasks.contract.parsing import CACHED, parse
from deepe_tasks.core.errors import InvalidParams

CALLBACK_MODULE = "train_callback"
TRAINING_FUNCTION = "training"
# Flags whose names are not the snake case of the platform parameter they carry.
RENAMED = {"PromptInputColumn": "input_train_name", "PromptOutputColumn": "output_train_name"}
# What DeepExtension passes besides the parameters: the job, the attempt, the model's folder name.
EXTRAS = ("train_id", "seq", "model_name")
# Parameters the platform acts on itself, read by the file or not: where the model is published,
# and the evaluation (whose parameters, given to a trainer without eval_dataset, get a warning).
PLATFORM_OWN = frozenset({"OUTPUT_DIR", "KEEP_BEST", "EVAL_DATASET_PATH", "EVAL_SPLIT", "EVAL_STEPS"})


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


def _key(name: str) -> str:
    """A name as a flag may spell it: `--MODEL_PATH`, `--model-path`, `model_path` → modelpath."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def flag_name(param: str) -> str:
    """MODEL_PATH → model_path, PromptInputColumn → input_train_name, a custom key as it is."""
    return RENAMED.get(param) or snake_case(param)


def text(value: Any) -> str:
    """A value as a flag's text. argparse's `type=bool` reads any non-empty string as True: false
    must be the empty string."""
    if isinstance(value, bool):
        return "True" if value else ""
    return str(value)


def values(params: dict[str, Any], *, job_id: str, attempt: int) -> dict[str, Any]:
    """What a flag may take: every parameter with a value, and DeepExtension's three extras."""
    out = {k: v for k, v in params.items() if v is not None}
    model_name = str(params.get("OUTPUT_DIR") or job_id).rstrip("/").rsplit("/", 1)[-1]
    out.update(train_id=job_id, seq=attempt, model_name=model_name)
    return out


def param_for(names: Iterable[str], given: dict[str, Any]) -> str | None:
    """The key of ``given`` that a flag takes, by any of its names (its option strings first, then
    its dest); None when none. The platform's parameters come before custom keys."""
    index: dict[str, str] = {}
    ordered = [*(k for k in TrainParams.model_fields if k in given), *EXTRAS, *given]
    for key in ordered:
        if key in given:
            index.setdefault(_key(key), key)
    for param, flag in RENAMED.items():
        if param in given:
            index.setdefault(_key(flag), param)
    return next((index[_key(n)] for n in names if _key(n) in index), None)


def wanted(flag: str) -> str:
    """The parameter to give for a flag that nothing fills: --input_train_name → PromptInputColumn."""
    renamed = {_key(f): p for p, f in RENAMED.items()}
    platform = {_key(p): p for p in TrainParams.model_fields}
    return renamed.get(_key(flag)) or platform.get(_key(flag)) or flag.lstrip("-+/")


def missing_message(flags: list[str]) -> str:
    return ("This DeepExtension method requires " + ", ".join(flags) + "; give "
            + ", ".join(f"{wanted(f)} (-p {wanted(f)}=…)" for f in flags) + ".")


def given(params: dict[str, Any], source: str) -> dict[str, Any]:
    """The parameters someone gave for the method to read: the platform's that differ from their
    default (except those the platform acts on itself), custom keys, and declared parameters that
    differ from the file's default."""
    declared = _declared(source)
    out = {}
    for key, value in params.items():
        field = TrainParams.model_fields.get(key)
        if value is None or key in PLATFORM_OWN:
            continue
        if field is not None and value == field.default:
            continue
        if key in declared and value == declared[key]:
            continue
        out[key] = value
    return out


def _declared(source: str) -> dict[str, Any]:
    try:
        return {name: d.default for name, d in declared_params(source).items()}
    except Exception:  # a bad declaration is the check's to report
        return {}


@functools.lru_cache(maxsize=CACHED)
def read_directly(source: str) -> frozenset[str]:
    """Parameters the file reads without a flag: an injected name it uses but never assigns
    (`MAX_STEPS`), and, when it uses `params`, every name it spells (`params["my_key"]`)."""
    tree = parse(source)
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    stored = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    out = loaded - stored
    if "params" in out:
        out |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        out |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    return frozenset(out)


def unread_message(filename: str, unread: dict[str, Any], flags: list[str]) -> str:
    shown = ", ".join(f"{k}={v!r}" for k, v in unread.items())
    first = next(iter(unread))
    declared = ", ".join(flags) if flags else "none"
    return (f"{shown} {'was' if len(unread) == 1 else 'were'} given, but {filename} declares no flag that takes "
            f"{'it' if len(unread) == 1 else 'them'} (its flags: {declared}), so it would train without "
            f"{'it' if len(unread) == 1 else 'them'}. Add a flag to the file's parser "
            f"(parser.add_argument('--{flag_name(first)}', ...)) and use its value, or leave "
            f"{'it' if len(unread) == 1 else 'them'} out.")


def _flags(source: str) -> dict[str, bool]:
    """The `--flag` arguments the source shows literally: {flag: required and without a default}.
    Flags made in a loop or a function are not seen: the job process finds them when it runs."""
    out: dict[str, bool] = {}
    for node in ast.walk(parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            kw = {k.arg: k.value for k in node.keywords}
            flag = kw.get("required")
            required = isinstance(flag, ast.Constant) and flag.value is True
            for name in names:
                if name.startswith("--"):
                    out[name] = required and "default" not in kw
    return out


def arguments(source: str, params: dict[str, Any], *, job_id: str, attempt: int) -> list[str]:
    """The `--flag=value` arguments for the flags the source shows literally (submit's view).

    Raises InvalidParams when a flag the file requires has no value.
    """
    have = values(params, job_id=job_id, attempt=attempt)
    flags = {flag: param_for([flag], have) for flag in _flags(source)}
    missing = [f for f, required in _flags(source).items() if required and flags[f] is None]
    if missing:
        raise InvalidParams(missing_message(missing))
    return [f"{flag}={text(have[key])}" for flag, key in flags.items() if key is not None]


def command_line(params: dict[str, Any], *, job_id: str, attempt: int) -> list[str]:
    """Every parameter as `--key=value`, as DeepExtension's backend passes them: `sys.argv[1:]`
    while the file runs, for code that reads it without a parser."""
    return [f"--{flag_name(k)}={text(v)}" for k, v in values(params, job_id=job_id, attempt=attempt).items()]
