"""An evaluation job: a model (a job's published adapter on its base, a merged model, or a base
model) answers a dataset's prompts. It runs as any job does (a queue, a worker, a lease, a
fenced publish; started again if its worker is lost), with the platform's code instead of a
method, and publishes ``eval.json``:

- ``loss`` and ``perplexity`` of the expected answers given the prompts (the answer tokens only,
  framed as SFT-Demo frames them: the chat template where the tokenizer has one);
- greedy generations, scored by ``exact_match`` (after trimming spaces and case) and ``rouge_l``
  (Google's ``rouge-score``, offline);
- ``samples``: the first prompts with the expected and the generated answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepe_tasks.core.errors import AttemptFenced, InvalidParams
from deepe_tasks.core.fences import AlreadyPublished
from deepe_tasks.core.records import (
    EVAL_METHOD,
    Event,
    EventKind,
    JobSpec,
    JobStatus,
    Phase,
    RunResult,
    StopReason,
)
from deepe_tasks.core.storage import MANIFEST
from deepe_tasks.job import phases, remote
from deepe_tasks.job.callback import Emit, StopCheck
from deepe_tasks.job.phases import describe
from deepe_tasks.job.publish import publish_model

log = logging.getLogger(__name__)

RESULTS = "eval.json"
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_PROMPT_TOKENS = 1024  # a longer prompt keeps its last tokens (a 10 MB line costs no more)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted([path] if path.is_file() else (p for p in path.rglob("*") if p.is_file())):
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class Stopped(Exception):
    def __init__(self, result: RunResult) -> None:
        super().__init__(result.error)
        self.result = result


class EvalRunner:
    """Runs one attempt of an evaluation job; the same interface as ``runner.Runner`` for jobproc."""

    collective_save = False

    def __init__(self, spec: JobSpec, emit: Emit, should_stop: StopCheck | None = None,
                 may_publish: Callable[[], bool] | None = None, rank: int = 0) -> None:
        self.spec, self.emit, self.should_stop, self.may_publish = spec, emit, should_stop, may_publish
        self.stopped = False
        self.tracker = phases.PhaseTracker(spec.job_id, emit)
        p = spec.params
        self.model_path = Path(p["MODEL_PATH"])
        self.adapter = Path(p["ADAPTER_PATH"]) if p.get("ADAPTER_PATH") else None
        self.dataset = Path(p["DATASET_PATH"]) if p.get("DATASET_PATH") else None
        self.target = Path(p["OUTPUT_DIR"])
        self.input_column = p.get("PromptInputColumn") or "instruction"
        self.output_column = p.get("PromptOutputColumn") or "output"
        self.max_samples = int(p.get("MAX_SAMPLES") or 0)
        self.shown = int(p.get("SAMPLES", 5))
        self.max_new_tokens = int(p.get("MAX_NEW_TOKENS", 64))
        store = remote.active()
        self.published_at = store.output_url if store is not None and store.output_url else str(self.target)

    def run(self) -> RunResult:
        t0 = time.monotonic()
        try:
            self.tracker.enter(Phase.BUILDING_MODEL, f"loading {self.model_path}"
                               + (f" with the adapter {self.adapter}" if self.adapter else ""))
            model, tokenizer = self._model()
            self._go_on()
            results = self._evaluate(model, tokenizer)
            metrics = results["metrics"]
            results.update({"seconds": round(time.monotonic() - t0, 3), "finished_at": time.time()})
            done = [f"{results['rows']} rows"] if self.dataset else []
            done += [f"the lm-eval task {results['lm_eval']['task']}"] if results["lm_eval"] else []
            self.emit(Event(kind=EventKind.EVAL, job=self.spec.job_id, metrics=metrics,
                            message=f"evaluated on {' and '.join(done)}"))
            self._go_on()
            self.tracker.enter(Phase.SAVING, f"saving {RESULTS} to {self.target}")
            publish_model(self.spec, self.target, lambda staging: self._stage(staging, results), self.may_publish,
                          what="evaluation", fix="Evaluate again.", before_publish=self._go_on)
        except Stopped as e:
            self.stopped = True
            return e.result.model_copy(update={"phase": self.tracker.phase})
        except AttemptFenced as e:
            return RunResult(status=JobStatus.QUEUED, phase=Phase.SAVING, error=str(e))
        except AlreadyPublished:
            return RunResult(status=JobStatus.SUCCEEDED, phase=Phase.SAVING, output_dir=self.published_at)
        except InvalidParams as e:
            return RunResult(status=JobStatus.FAILED, phase=self.tracker.phase,
                             error=f"Failed while {self.tracker.phase}: {e}")
        except Exception as e:
            log.exception("the evaluation failed")
            return RunResult(status=JobStatus.FAILED, phase=self.tracker.phase,
                             error=describe(e, self.tracker.phase, "the evaluation"))
        return RunResult(status=JobStatus.SUCCEEDED, phase=Phase.SAVING, output_dir=self.published_at,
                         metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def _evaluate(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        """eval.json but its times: the dataset's metrics and samples, and the lm-eval task's."""
        metrics: dict[str, Any] = {}
        samples: list[Any] = []
        rows: list[dict[str, Any]] = []
        truncated = 0
        if self.dataset is not None:
            self.tracker.enter(Phase.LOADING_DATASET, f"reading {self.dataset}")
            rows = self._rows()
            self._go_on()
            self.tracker.enter(Phase.TRAINING, f"evaluating on {len(rows)} rows")
            metrics, samples, truncated = self._score(model, tokenizer, rows)
        block = None
        if self.spec.params.get("LM_EVAL_TASK"):
            from deepe_tasks.job import lmeval

            self.tracker.enter(Phase.LOADING_DATASET, f"reading the lm-eval task {self.spec.params['LM_EVAL_TASK']}")
            self.tracker.enter(Phase.TRAINING, "running the lm-eval task")
            block = lmeval.run(model, tokenizer, self.spec.params, Path(self.spec.storage_root),
                               self.spec.input_roots, self._go_on)
            metrics.update(lmeval.flat(block))
        p = self.spec.params
        return {
            "job": self.spec.job_id, "method": EVAL_METHOD, "evaluated": p.get("EVALUATED"),
            "model": str(p.get("MODEL_URL") or self.model_path),
            "adapter": p.get("ADAPTER_URL") or (str(self.adapter) if self.adapter else None),
            "dataset": str(p.get("DATASET_URL") or self.dataset) if self.dataset else None,
            "dataset_sha256": file_sha256(self.dataset) if self.dataset else None, "rows": len(rows),
            "truncated_prompts": truncated, "model_sha256": file_sha256(self.adapter or self.model_path),
            "metrics": metrics, "samples": samples, "lm_eval": block,
        }

    def _go_on(self) -> None:
        reason = self.should_stop() if self.should_stop is not None else None
        if reason is None:
            return
        if reason in (StopReason.CANCEL, StopReason.CANCEL_SAVE):
            raise Stopped(RunResult(status=JobStatus.CANCELLED, error="cancelled; nothing was published"))
        if reason is StopReason.TIME_LIMIT:
            raise Stopped(RunResult(status=JobStatus.FAILED, error="time limit reached; nothing was published"))
        raise Stopped(RunResult(status=JobStatus.QUEUED, error=f"stopped ({reason}); it starts again"))

    def _model(self) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        model: Any = AutoModelForCausalLM.from_pretrained(str(self.model_path), dtype=dtype)
        if self.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(self.adapter))
        tokenizer = AutoTokenizer.from_pretrained(str(self.adapter or self.model_path))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        model.eval()
        return model, tokenizer

    def _rows(self) -> list[dict[str, Any]]:
        from datasets import load_dataset, load_from_disk

        assert self.dataset is not None
        path = self.dataset
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            data: Any = load_from_disk(str(path))
            if hasattr(data, "keys"):
                data = data["train"] if "train" in data else next(iter(data.values()))
        else:
            files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in FORMATS)
            kinds = {FORMATS.get(p.suffix) for p in files}
            if not files or None in kinds or len(kinds) != 1:
                raise InvalidParams(f"DATASET_PATH {path} must be one JSON, JSONL, CSV or Parquet file, or a folder of "
                                    "files of one of those kinds")
            data = load_dataset(kinds.pop() or "json", data_files=[str(p) for p in files], split="train")
        missing = [c for c in (self.input_column, self.output_column) if c not in data.column_names]
        if missing:
            raise InvalidParams(f"the dataset at {path} has no column {missing[0]!r}; its columns are "
                                f"{data.column_names}. Set PromptInputColumn/PromptOutputColumn to match.")
        if self.max_samples > 0:
            data = data.select(range(min(self.max_samples, len(data))))
        if len(data) == 0:
            raise InvalidParams(f"the dataset at {path} has no rows")
        return [{"prompt": str(r[self.input_column]), "answer": str(r[self.output_column])} for r in data]

    def _prompt_ids(self, tokenizer: Any, prompt: str) -> list[int]:
        if tokenizer.chat_template is not None:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]
        return list(ids)

    def _score(self, model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[Any], int]:
        import torch
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        device = next(model.parameters()).device
        total_loss = total_tokens = exact = 0.0
        rouge = 0.0
        samples: list[dict[str, str]] = []
        truncated = 0
        for i, row in enumerate(rows):
            if i % 8 == 0:
                self._go_on()
            prompt_ids = self._prompt_ids(tokenizer, row["prompt"])
            if len(prompt_ids) > MAX_PROMPT_TOKENS:
                prompt_ids, truncated = prompt_ids[-MAX_PROMPT_TOKENS:], truncated + 1
            answer_ids = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                answer_ids = [*answer_ids, tokenizer.eos_token_id]
            ids = torch.tensor([prompt_ids + answer_ids], device=device)
            labels = ids.clone()
            labels[0, :len(prompt_ids)] = -100  # the loss on the answer tokens only
            with torch.no_grad():
                loss = model(input_ids=ids, labels=labels).loss
                out = model.generate(input_ids=ids[:, :len(prompt_ids)], attention_mask=torch.ones_like(ids[:, :len(prompt_ids)]),
                                     max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            n = len(answer_ids)
            total_loss += float(loss) * n
            total_tokens += n
            generated = tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True).strip()
            exact += float(generated.strip().lower() == row["answer"].strip().lower())
            rouge += scorer.score(row["answer"], generated)["rougeL"].fmeasure
            if len(samples) < self.shown:
                samples.append({"prompt": row["prompt"][:2000], "expected": row["answer"][:2000],
                                "generated": generated[:2000]})
        mean_loss = total_loss / max(total_tokens, 1)
        metrics = {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 700.0)),
                   "exact_match": exact / len(rows), "rouge_l": rouge / len(rows), "rows": len(rows)}
        return metrics, samples, truncated

    def _stage(self, staging: Path, results: dict[str, Any]) -> None:
        (staging / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
        manifest = {"job": self.spec.job_id, "method": EVAL_METHOD, "evaluated": results["evaluated"],
                    "attempt": self.spec.attempt, "claim": self.spec.claim, "submitted_at": self.spec.submitted_at,
                    "worker": self.spec.worker or socket.gethostname(), "finished_at": time.time()}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
