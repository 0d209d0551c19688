"""Validation during training, the platform's half: a trainer that has an ``eval_dataset`` (the
built-in methods make one from EVAL_DATASET_PATH or EVAL_SPLIT; any method may) and no
evaluation schedule of the method's own is evaluated every EVAL_STEPS steps, 10 times a run by
default. Each evaluation becomes an ``eval`` event with ``eval_loss`` and ``perplexity``
(`callback.DeepeCallback.on_log`); the last one goes into the model's deepe.json."""

from __future__ import annotations

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
    it is not the last step's; what deepe.json says of it (None without an evaluation)."""
    best = trainer.state.best_model_checkpoint
    if best is None or trainer.state.best_metric is None:
        return None
    step = int(Path(best).name.rsplit("-", 1)[-1])
    if step != trainer.state.global_step:
        trainer._load_best_model()  # the trainer's own loader: full weights or a PEFT adapter
    return {"step": step, "eval_loss": trainer.state.best_metric}
