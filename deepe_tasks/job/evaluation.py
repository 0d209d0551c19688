"""Validation during training, the platform's half: a trainer that has an ``eval_dataset`` (the
built-in methods make one from EVAL_DATASET_PATH or EVAL_SPLIT; any method may) and no
evaluation schedule of the method's own is evaluated every EVAL_STEPS steps, 10 times a run by
default. Each evaluation becomes an ``eval`` event with ``eval_loss`` and ``perplexity``
(`callback.DeepeCallback.on_log`); the last one goes into the model's deepe.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from deepe_tasks.contract.params import TrainParams

EVALUATIONS = 10  # per run, when EVAL_STEPS is not given


def planned_steps(trainer: Any) -> int | None:
    """The optimizer steps the run will take: MAX_STEPS, or its epochs' worth; None if unknown."""
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    try:
        rows = len(trainer.train_dataset)
    except TypeError:
        return None  # an iterable dataset: its length is unknown
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    return max(1, int(math.ceil(math.ceil(rows / per_step) * float(args.num_train_epochs))))


def schedule(trainer: Any, params: TrainParams) -> str | None:
    """Set the evaluation schedule where the method set none; a warning to show when EVAL_*
    was given to a method whose trainer has no eval dataset, else None."""
    from transformers.trainer_utils import IntervalStrategy

    asked = [name for name in ("EVAL_DATASET_PATH", "EVAL_SPLIT", "EVAL_STEPS") if params.get(name) is not None]
    if getattr(trainer, "eval_dataset", None) is None:
        if asked:
            return (f"{', '.join(asked)} given, but the method's trainer has no eval_dataset, so nothing is evaluated: "
                    "pass eval_dataset=… to the trainer (the built-in methods make one from EVAL_DATASET_PATH or "
                    "EVAL_SPLIT).")
        return None
    args = trainer.args
    if IntervalStrategy(args.eval_strategy) is IntervalStrategy.NO:
        planned = planned_steps(trainer)
        args.eval_strategy = IntervalStrategy.STEPS
        args.eval_steps = params.EVAL_STEPS or max(1, (planned or EVALUATIONS) // EVALUATIONS)
    elif params.EVAL_STEPS is not None and IntervalStrategy(args.eval_strategy) is IntervalStrategy.STEPS:
        args.eval_steps = params.EVAL_STEPS
    return None


def load_best(trainer: Any) -> dict[str, Any] | None:
    """KEEP_BEST, after training: load the checkpoint with the lowest eval_loss into the model if
    it is not the last step's; what deepe.json says of it (None without an evaluation, or when the
    best checkpoint, an earlier attempt's, is gone)."""
    best = trainer.state.best_model_checkpoint
    if best is None or trainer.state.best_metric is None:
        return None
    step = int(Path(best).name.rsplit("-", 1)[-1])
    if step != trainer.state.global_step:
        if not Path(best).is_dir():  # the trainer's loader would only log it and keep the last step's weights
            trainer.state.best_model_checkpoint = None
            return None
        trainer._load_best_model()  # the trainer's own loader: full weights or a PEFT adapter
    return {"step": step, "eval_loss": trainer.state.best_metric}


def keep_best(trainer: Any) -> tuple[dict[str, Any] | None, str | None]:
    """KEEP_BEST, after training: `load_best`, and what to tell the user of it (None: nothing)."""
    best, step = load_best(trainer), trainer.state.global_step
    if best is not None:
        return best, None if best["step"] == step else (
            f"KEEP_BEST: publishing the checkpoint of step {best['step']} (eval_loss {best['eval_loss']:.4g}), the "
            f"lowest, not step {step}'s")
    if trainer.state.best_metric is None:
        return None, None
    # A resume drops a best checkpoint that it cannot find, and keeps its eval_loss.
    return None, (f"KEEP_BEST: the checkpoint of the best evaluation (eval_loss {trainer.state.best_metric:.4g}) is "
                  f"gone, so the last step's model, step {step}'s, is published")


TRAINER_STATE = "trainer_state.json"  # in a checkpoint: the trainer's state, the best checkpoint's name included


def best_named(checkpoint: Path) -> Path | None:
    """The best checkpoint that ``checkpoint``'s trainer state names (KEEP_BEST), as written."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    best = state.get("best_model_checkpoint") if isinstance(state, dict) else None
    return Path(best) if isinstance(best, str) and best else None


def in_job(path: Path, job_id: str) -> str | None:
    """``jobs/<job>/attempts/<n>/checkpoints/checkpoint-<step>``: where the checkpoint at ``path``
    is under any worker's storage root (an object store's local copies differ by worker)."""
    rel = path.parts[-6:]
    if len(rel) == 6 and rel[:3] == ("jobs", job_id, "attempts") and rel[3].isdigit() and rel[4] == "checkpoints" \
            and rel[5].startswith("checkpoint-") and rel[5].rsplit("-", 1)[-1].isdigit():
        return "/".join(rel)
    return None


def relocate_best(checkpoint: Path, best: Path) -> None:
    """Name ``best`` as the best checkpoint in ``checkpoint``'s trainer state (a local copy fetched
    from an object store, whose trainer state names the path on the worker that wrote it)."""
    path = checkpoint / TRAINER_STATE
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("best_model_checkpoint") != str(best):
        state["best_model_checkpoint"] = str(best)
        path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
