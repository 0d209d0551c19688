"""What submit checks before anything is queued, so that a job that cannot work never waits
for a GPU: the method's static check, its parameters (a near miss of a known name is refused,
declared ones are typed) and, where this machine sees the storage, the input paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepe_tasks.core import validate
from deepe_tasks.core.errors import InvalidParams, MethodContractError
from deepe_tasks.core.records import Phase
from deepe_tasks.queue.check import check_source
from deepe_tasks.queue.declared import apply_declared, declared_params
from deepe_tasks.queue.deepext import arguments, is_deepextension
from deepe_tasks.queue.methods import Method
from deepe_tasks.queue.params import TrainParams, parse_params, refuse_near_misses, resolve_params


@dataclass
class Admitted:
    params: TrainParams  # validated, paths resolved, declared parameters typed
    custom: list[str] = field(default_factory=list)  # keys passed on as they are
    warnings: list[str] = field(default_factory=list)  # from the static check


def admit(method: Method, raw: dict[str, Any], storage_root: Path, job_id: str, *, check_paths: bool,
          check_method: bool = True, gpu: bool | None = True) -> Admitted:
    """Everything submit refuses, as the errors `deepe submit` prints (exit 2, HTTP 422).

    ``gpu``: whether the machine that will run the job has CUDA (True for a GPU worker; None
    for this machine, as for `run-local`).
    """
    report = check_source(method.source, method.path.name, gpu=gpu)
    if check_method and not report.ok:
        raise MethodContractError(f"{method.name} would fail on a worker: " + " ".join(report.errors)
                                  + f" (`deepe methods check {method.name}` shows the same.)")
    declared = declared_params(method.source)
    raw = validate.params(raw)
    custom = refuse_near_misses(raw, list(declared))
    params = parse_params(raw)
    if declared:
        params = params.model_copy(update=apply_declared(raw, declared))
    resolved = resolve_params(params, storage_root, job_id)
    if is_deepextension(method.source):
        arguments(method.source, resolved.as_dict(), job_id=job_id, attempt=1)  # a required flag left without a value
    if check_paths:
        inputs_exist(params, resolved, storage_root)
    return Admitted(resolved, custom, report.warnings)


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
    data = Path(resolved.DATASET_PATH)
    if not data.exists():
        problems.append(("DATASET_PATH", Phase.LOADING_DATASET, f"DATASET_PATH={given.DATASET_PATH!r} resolves to "
                         f"{data}, which does not exist; give a dataset file or folder (JSON, JSONL, CSV, Parquet or "
                         "save_to_disk)."))
    return problems


def inputs_exist(given: TrainParams, resolved: TrainParams, storage_root: Path) -> None:
    """Refuse a MODEL_PATH that is not a model folder, or a DATASET_PATH that is not there."""
    problems = input_problems(given, resolved)
    if problems:
        raise InvalidParams(" ".join(p for _, _, p in problems) + f" Relative paths resolve under DEEPE_STORAGE="
                            f"{storage_root}. If this machine does not mount the workers' storage, set "
                            "DEEPE_CHECK_PATHS=false.")
