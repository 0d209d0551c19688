"""What submit checks before anything is queued, so that a job that cannot work never waits
for a GPU: the method's static check, its parameters (a near miss of a known name is refused,
declared ones are typed) and, where this machine sees the storage, the input paths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepe_tasks.contract import stored
from deepe_tasks.contract.check import check_source
from deepe_tasks.contract.declared import PATH, Declared, apply_declared, declared_params
from deepe_tasks.contract.deepext import arguments, is_deepextension
from deepe_tasks.contract.methods import Method
from deepe_tasks.contract.params import (
    TrainParams,
    parse_params,
    refuse_near_misses,
    resolve_params,
)
from deepe_tasks.core import validate
from deepe_tasks.core.errors import InvalidParams, MethodContractError
from deepe_tasks.core.records import Phase
from deepe_tasks.core.settings import get_settings


@dataclass
class Admitted:
    params: TrainParams  # validated, paths resolved, declared parameters typed
    custom: list[str] = field(default_factory=list)  # keys passed on as they are
    warnings: list[str] = field(default_factory=list)  # from the static check


def admit(method: Method, raw: dict[str, Any], storage_root: Path, job_id: str, *, check_paths: bool,
          check_method: bool = True, gpu: bool | None = True, input_roots: Sequence[Path] | None = None,
          storage_url: str | None = None) -> Admitted:
    """Everything submit refuses, as the errors `deepe submit` prints (exit 2, HTTP 422).

    ``gpu``: whether the machine that will run the job has CUDA (True for a GPU worker; None
    for this machine, as for `run-local`). ``input_roots``: the folders besides the storage
    that input paths may name; None takes DEEPE_INPUT_ROOTS for a job that a worker runs, and
    sets no bound for a run on this machine (gpu None), which reads with its caller's rights.
    ``storage_url``: an object store (``storage_root`` is then this machine's local copy of its
    layout): paths may be URLs inside it, are checked on it, and come back as its URLs.
    """
    report = check_source(method.source, method.path.name, gpu=gpu)
    if check_method and not report.ok:
        raise MethodContractError(f"{method.name} would fail on a worker: " + " ".join(report.errors)
                                  + f" (`deepe methods check {method.name}` shows the same.)")
    declared = declared_params(method.source)
    raw = validate.params(raw, numbers=False)  # text, names and depth; numbers once typed, below
    paths = [*input_names(declared), *stored.OUTPUTS]
    raw = stored.to_relative(raw, paths, storage_url)
    custom = refuse_near_misses(raw, list(declared))
    params = parse_params(raw)
    if declared:
        params = params.model_copy(update=apply_declared(raw, declared))
    resolved = resolve_params(params, storage_root, job_id)
    if declared:
        resolved = resolved.model_copy(update=resolve_declared_paths(resolved.as_dict(), declared, storage_root))
    validate.params(resolved.as_dict())  # every value as it will be stored: finite, 64-bit, UTF-8
    if input_roots is None and gpu is not None:
        input_roots = get_settings().input_root_list
    if input_roots is not None:
        inputs_allowed(params, declared, storage_root, input_roots)  # as given: the message repeats them
    if is_deepextension(method.source):
        arguments(method.source, resolved.as_dict(), job_id=job_id, attempt=1)  # a required flag left without a value
    if storage_url is not None:
        urls = stored.to_urls(resolved.as_dict(), paths, storage_root, storage_url)
        if check_paths:
            stored.inputs_on_store(params.as_dict(), urls, storage_url)
        return Admitted(resolved.model_copy(update=urls), custom, report.warnings)
    if check_paths:
        inputs_exist(params, resolved, storage_root)
    return Admitted(resolved, custom, report.warnings)


def input_names(declared: dict[str, Declared]) -> list[str]:
    """The parameters that name a file the job reads: the platform's two and declared Paths."""
    return ["MODEL_PATH", "DATASET_PATH", "EVAL_DATASET_PATH", *(name for name, d in declared.items() if d.type == PATH)]


def resolve_declared_paths(values: dict[str, Any], declared: dict[str, Declared], storage_root: Path) -> dict[str, Any]:
    """The method's Path parameters as absolute paths (relative ones under the storage)."""
    out = {}
    for name, spec in declared.items():
        if spec.type == PATH and values.get(name) is not None:
            path = Path(validate.path_text(str(values[name]), name)).expanduser()  # a default may be any literal
            out[name] = str((path if path.is_absolute() else storage_root / path).resolve())
    return out


def inputs_allowed(given: TrainParams, declared: dict[str, Declared], storage_root: Path,
                   roots: Sequence[Path]) -> None:
    """Refuse an input path outside the storage and every DEEPE_INPUT_ROOTS folder (docs/methods.md,
    "Who may read what"): a job must not read /etc/shadow as its dataset."""
    problems = [validate.input_path_allowed(given.get(name), storage_root, roots, name=name)
                for name in input_names(declared) if given.get(name) is not None]
    if any(problems):
        raise InvalidParams(" ".join(p for p in problems if p))


def input_problems(given: TrainParams, resolved: TrainParams) -> list[tuple[str, Phase, str]]:
    """(parameter, the phase that would fail, the problem) for an input that is not there."""
    problems = []
    model = Path(resolved.MODEL_PATH)
    if not model.is_dir():
        problems.append(("MODEL_PATH", Phase.BUILDING_MODEL, f"MODEL_PATH={given.MODEL_PATH!r} resolves to {model}, "
                         "which is not a folder here; give a model folder (with config.json)."))
    elif not any((model / name).is_file() for name in ("config.json", "adapter_config.json")):
        problems.append(("MODEL_PATH", Phase.BUILDING_MODEL, f"MODEL_PATH={given.MODEL_PATH!r} resolves to {model}, "
                         "which has no config.json; give the folder that save_pretrained wrote."))
    for name in ("DATASET_PATH", "EVAL_DATASET_PATH"):
        value = resolved.get(name)
        if value is not None and not Path(value).exists():
            problems.append((name, Phase.LOADING_DATASET, f"{name}={given.get(name)!r} resolves to {value}, which "
                             "does not exist; give a dataset file or folder (JSON, JSONL, CSV, Parquet or save_to_disk)."))
    return problems


def inputs_exist(given: TrainParams, resolved: TrainParams, storage_root: Path) -> None:
    """Refuse a MODEL_PATH that is not a model folder, or a DATASET_PATH that is not there."""
    problems = input_problems(given, resolved)
    if problems:
        raise InvalidParams(" ".join(p for _, _, p in problems) + f" Relative paths resolve under DEEPE_STORAGE="
                            f"{storage_root}. If this machine does not mount the workers' storage, set "
                            "DEEPE_CHECK_PATHS=false.")
