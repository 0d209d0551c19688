"""GRPO-Demo: each reward function on known completions, and a real GRPO run on a worker."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import EventKind, JobStatus, submit
from deepe_tasks.contract.methods import BUILTIN
from deepe_tasks.fixtures import tiny
from tests.helpers import Worker

ROOT = Path(__file__).resolve().parent.parent
GRPO = BUILTIN / "grpo-demo.py"


@pytest.fixture(scope="module")
def rewards() -> dict[str, Any]:
    """The method's reward functions, without running the rest of it (no model, no data)."""
    tree = ast.parse(GRPO.read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    used = {n.id for f in functions for n in ast.walk(f) if isinstance(n, ast.Name)}
    # Only the imports the functions use (`re`): the training stack stays unloaded.
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
               and {(a.asname or a.name).split(".")[0] for a in n.names} & used]
    keep: list[ast.stmt] = [*imports, *functions, *(n for n in tree.body if isinstance(n, ast.Assign)
                                   and any(getattr(t, "id", "") == "SYSTEM_PROMPT" for t in n.targets))]
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(GRPO), "exec"), namespace)
    return namespace


PERFECT = "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>\n"
SLOPPY = "<reasoning>3 + 4</reasoning> <answer>7</answer> and more"
WRONG = "<reasoning>\nguess\n</reasoning>\n<answer>\neight\n</answer>\n"
NOTHING = "I think it is 7"


def test_correctness_reward(rewards: dict[str, Any]) -> None:
    assert rewards["correctness_reward"]([PERFECT, SLOPPY, WRONG, NOTHING], answer=["7"] * 4) == [2.0, 2.0, 0.0, 0.0]


def test_int_reward(rewards: dict[str, Any]) -> None:
    assert rewards["int_reward"]([PERFECT, WRONG, "<answer>\n-3\n</answer>"]) == [0.5, 0.0, 0.5]


def test_strict_format_reward(rewards: dict[str, Any]) -> None:
    assert rewards["strict_format_reward"]([PERFECT, SLOPPY, NOTHING]) == [0.5, 0.0, 0.0]


def test_soft_format_reward(rewards: dict[str, Any]) -> None:
    assert rewards["soft_format_reward"]([PERFECT, SLOPPY, NOTHING]) == [0.5, 0.5, 0.0]


def test_xmlcount_reward(rewards: dict[str, Any]) -> None:
    perfect, sloppy, nothing = rewards["xmlcount_reward"]([PERFECT, SLOPPY, NOTHING])
    assert perfect == pytest.approx(0.5) and nothing == 0.0 and 0.0 <= sloppy < 0.5
    trailing = rewards["xmlcount_reward"]([PERFECT + "extra text"])[0]
    assert trailing < perfect


def test_rewards_read_chat_messages_too(rewards: dict[str, Any]) -> None:
    chat = [[{"role": "assistant", "content": PERFECT}]]
    assert rewards["correctness_reward"](chat, answer=["7"]) == [2.0]
    assert rewards["strict_format_reward"](chat) == [0.5]


def test_the_answer_after_hashes_is_extracted(rewards: dict[str, Any]) -> None:
    assert rewards["extract_hash_answer"]("3 + 4 = 7\n#### 1,007") == "1007"
    assert rewards["extract_hash_answer"]("no marker") is None


@pytest.mark.e2e
def test_grpo_demo_trains_on_a_worker_and_reports_reward_metrics(worker: Worker, tiny_model: Path,
                                                                 storage: Path) -> None:
    data = tiny.write_jsonl(tiny.gsm_rows(16), storage / "data" / "gsm.jsonl")
    job = submit("grpo-demo", {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(data), "MAX_STEPS": 3,
                               "BATCH_SIZE": 2, "NUM_GENERATIONS": 2, "MAX_CONTENT_LENGTH": 16,
                               "MAX_INPUT_LENGTH": 128, "LORA_RANK": 4})
    assert job.wait(timeout=240) is JobStatus.SUCCEEDED, job.info()["error"]
    logs = [e for e in job.events() if e.kind is EventKind.LOG and "reward" in e.metrics]
    assert [e.step for e in logs] == [1, 2, 3]
    for name in ("reward", "reward_std", "kl", "rewards/correctness_reward/mean", "rewards/int_reward/mean",
                 "rewards/strict_format_reward/mean", "rewards/soft_format_reward/mean",
                 "rewards/xmlcount_reward/mean"):
        assert name in logs[0].metrics, name
    assert (Path(job.info()["output_dir"]) / "deepe.json").is_file()


def test_prompts_over_max_input_length_are_filtered_with_a_clear_error_when_none_fit(
        tiny_model: Path, storage: Path) -> None:
    from deepe_tasks.ui.local import run_method_file

    data = tiny.write_jsonl(tiny.gsm_rows(4), storage / "data" / "gsm4.jsonl")
    result = run_method_file(GRPO, {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(data),
                                    "MAX_INPUT_LENGTH": 5, "MAX_STEPS": 1}, lambda e: None)
    assert result.status is JobStatus.FAILED and "MAX_INPUT_LENGTH=5" in (result.error or "")
