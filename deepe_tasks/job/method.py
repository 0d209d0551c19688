"""A method in the job process: its inputs checked, its pinned source executed with the
parameters and the callback injected, and the contract checked on what it defined."""

from __future__ import annotations

import contextlib
import linecache
import logging
import socket
import traceback
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deepe_tasks.contract import deepext
from deepe_tasks.contract.admission import input_problems, inputs_allowed
from deepe_tasks.contract.check import Problem, check_source
from deepe_tasks.contract.declared import declared_params
from deepe_tasks.contract.hardware import BF16_FIX, LOAD_IN_4BIT_FIX, has_cuda, params_need_gpu
from deepe_tasks.contract.params import TrainParams
from deepe_tasks.core.errors import DeepeError, InvalidParams, MethodContractError
from deepe_tasks.core.records import Event, EventKind, JobSpec, Phase
from deepe_tasks.core.storage import attempt_dir
from deepe_tasks.job import deepext_shim, phases
from deepe_tasks.job.callback import DeepeCallback, Emit
from deepe_tasks.job.phases import PhaseFailure, column_hint, describe

log = logging.getLogger(__name__)
POST_INIT = "__post_init__"  # where a trainer config's output_dir is set (`scratch_in`)


def filename(spec: JobSpec) -> str:
    return f"{spec.method}.py"


def inputs_exist(spec: JobSpec, params: TrainParams) -> None:
    """The clear message for a missing MODEL_PATH or DATASET_PATH, before the libraries' own;
    and the input-path rule again, here: a link swapped into the storage after submit."""
    if spec.input_roots is not None:
        try:
            inputs_allowed(params, declared_params(spec.source), Path(spec.storage_root),
                           [Path(p) for p in spec.input_roots])
        except (InvalidParams, MethodContractError) as e:
            raise PhaseFailure(Phase.PREPARING, f"Failed while {Phase.PREPARING}: {e}") from e
    problems = input_problems(params, params)
    if problems:
        param, phase, problem = problems[0]  # the one the method would meet first
        raise PhaseFailure(phase, f"Failed while {phase}: {problem} (on {socket.gethostname()}: check that "
                                  f"the workers mount the storage where {param} points).")


def execute(spec: JobSpec, params: TrainParams, callback: DeepeCallback, tracker: phases.PhaseTracker,
            emit: Emit) -> dict[str, Any]:
    """Run the method's source; return its namespace. Raises PhaseFailure naming the phase."""
    name = filename(spec)
    report = check_source(spec.source, name)
    for syntax in report.of(Problem.SYNTAX):
        raise PhaseFailure(Phase.LOADING_METHOD, f"Failed while {Phase.LOADING_METHOD}: {name}: {syntax.message}")
    misuse = report.of(Problem.PLATFORM_CALL)
    if misuse:
        raise PhaseFailure(Phase.LOADING_METHOD, f"Failed while {Phase.LOADING_METHOD}: {name} breaks "
                           "the method contract. " + " ".join(f.message for f in misuse))
    # What will fail on this machine is said before it does (a worker or a laptop without CUDA).
    for warning in [f.message for f in report.of(Problem.NEEDS_GPU)] + params_need_gpu(params.as_dict()):
        emit(Event(kind=EventKind.LOG, job=spec.job_id, message=f"warning: {warning}"))
    module = types.ModuleType(f"deepe_method_{spec.method.replace('-', '_')}")
    module.__file__ = name
    ns = module.__dict__
    # Every parameter under its own name, plus `params` (custom keys included) and `callback`.
    ns.update({field: getattr(params, field) for field in TrainParams.model_fields})
    ns.update(params=params, callback=callback)
    linecache.cache[name] = (len(spec.source), None, spec.source.splitlines(keepends=True), name)
    code = compile(spec.source, name, "exec")
    try:
        with tracker.watching(), scratch_in(checkpoint_dir(spec)), \
                _deepextension(spec, params, callback, tracker, emit):
            exec(code, ns)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        log.exception("the method raised")
        if isinstance(e, SystemExit):
            e = RuntimeError(f"the method called sys.exit({e.code!r})")
        phase = tracker.phase
        if isinstance(e, DeepeError):  # deepe's own sentence (a DeepExtension file's arguments)
            raise PhaseFailure(phase, f"Failed while {phase}: {e}") from e
        own = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == name]
        if own:
            phase = phases.refine(phase, own[-1].line or "")
        raise PhaseFailure(phase, describe(e, phase, name) + column_hint(e, ns) + gpu_hint(e, phase, params)) from e
    return ns


def checkpoint_dir(spec: JobSpec) -> Path:
    """The attempt's folder for the trainer's checkpoints and scratch."""
    return attempt_dir(Path(spec.storage_root), spec.job_id, spec.attempt) / "checkpoints"


@contextlib.contextmanager
def scratch_in(folder: Path) -> Iterator[None]:
    """Every trainer config the method builds has ``folder`` as its `output_dir` from the start, so
    that `SFTConfig(output_dir="out")` leaves no `out/` where the process runs (a Trainer makes its
    output_dir as it is built, before the contract check could point it elsewhere)."""
    from transformers import TrainingArguments

    original = TrainingArguments.__dict__[POST_INIT]

    def post_init(args: Any) -> None:
        args.output_dir = str(folder)
        original(args)

    setattr(TrainingArguments, POST_INIT, post_init)
    try:
        yield
    finally:
        setattr(TrainingArguments, POST_INIT, original)


def gpu_hint(exc: BaseException, phase: Phase, params: TrainParams) -> str:
    """The fix for a failure that a machine without a (bf16) GPU causes."""
    text = str(exc)
    if "support bf16/gpu" in text:
        return f" TRL's configs (SFTConfig, GRPOConfig, …) turn bf16 on unless told otherwise. {BF16_FIX}"
    four_bit = phase is Phase.BUILDING_MODEL or any(w in text.lower() for w in ("bitsandbytes", "cuda", "quantiz"))
    if params.LOAD_IN_4BIT and four_bit and not has_cuda() and "LOAD_IN_4BIT" not in text:  # the method's own says it
        return f" {LOAD_IN_4BIT_FIX}"
    return ""


def _deepextension(spec: JobSpec, params: TrainParams, callback: DeepeCallback, tracker: phases.PhaseTracker,
                   emit: Emit) -> contextlib.AbstractContextManager[None]:
    """For a DeepExtension file: its `train_callback` module and its arguments."""
    if not deepext.is_deepextension(spec.source):
        return contextlib.nullcontext()
    arguments = deepext_shim.Arguments(spec.source, params.as_dict(), job_id=spec.job_id, attempt=spec.attempt,
                                       filename=filename(spec))
    return deepext_shim.installed(deepext_shim.module(spec.job_id, callback, tracker, emit), arguments)


def check_contract(ns: dict[str, Any], spec: JobSpec, callback: DeepeCallback, checkpoint_dir: Path) -> tuple[Any, bool]:
    """The method's trainer, set up to train under deepe, and whether saving it is a collective
    of every rank (FSDP). Raises PhaseFailure when the method did not fulfil the contract."""
    missing = []
    for name, attr in (("model", "save_pretrained"), ("tokenizer", "save_pretrained"), ("trainer", "train")):
        if name not in ns:
            missing.append(f"`{name}` is not defined")
        elif not callable(getattr(ns[name], attr, None)):
            missing.append(f"`{name}` ({type(ns[name]).__name__}) has no {attr}()")
    if missing:
        raise PhaseFailure(Phase.LOADING_METHOD, str(MethodContractError(
            f"Failed while {Phase.LOADING_METHOD}: {filename(spec)} does not fulfil the contract: "
            + "; ".join(missing) + ". Define `model`, `tokenizer` and `trainer` between the marker lines.")))
    trainer = ns["trainer"]
    collective_save = _distributed(trainer, spec)
    args = getattr(trainer, "args", None)
    if args is not None and hasattr(args, "output_dir"):
        # Trainer scratch and checkpoints go to the job folder, never into OUTPUT_DIR,
        # which only ever receives the finished, published model. The last two are kept.
        args.output_dir = str(checkpoint_dir)
        args.save_total_limit = 2
    handler = getattr(trainer, "callback_handler", None)
    if handler is not None and not any(cb is callback for cb in handler.callbacks):
        trainer.add_callback(callback)
    if handler is not None:
        # deepe's events say what transformers' printer and progress bar would: once is enough.
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for quiet in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(quiet)
    return trainer, collective_save


def _distributed(trainer: Any, spec: JobSpec) -> bool:
    """Whether the model is sharded over the ranks (FSDP), so that saving it is a collective;
    raises PhaseFailure for an FSDP set-up that would publish no weights or not shard at all."""
    args = getattr(trainer, "args", None)
    collective = spec.world_size > 1 and bool(getattr(trainer, "is_fsdp_enabled", False))
    if collective and "FULL_STATE_DICT" not in str(getattr(getattr(
            trainer.accelerator.state, "fsdp_plugin", None), "state_dict_type", "")):
        raise PhaseFailure(Phase.BUILDING_TRAINER, (
            f"Failed while {Phase.BUILDING_TRAINER}: the trainer shards the model with FSDP but saves a sharded "
            "state dict, which would publish a model without its weights. Add fsdp_config={'state_dict_type': "
            "'FULL_STATE_DICT'} to the trainer's config."))
    if getattr(args, "fsdp", None) and not getattr(trainer, "is_fsdp_enabled", False):
        raise PhaseFailure(Phase.BUILDING_TRAINER, (
            f"Failed while {Phase.BUILDING_TRAINER}: the trainer's config asks for FSDP (fsdp={args.fsdp!r}), which "  # type: ignore[union-attr]
            "needs CUDA devices and a job of gpus=2 or more; here accelerate would train without it, every rank "
            "holding the whole model. Submit the job with --gpus N to a GPU worker, or remove fsdp from the "
            "config to train with DDP."))
    return collective
