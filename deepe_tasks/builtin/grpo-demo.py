"""GRPO-Demo: reinforcement learning (GRPO) on GSM8K-style maths with format and answer rewards.

Parameters: MODEL_PATH, DATASET_PATH (a question column and an answer column whose number
follows '####'), PromptInputColumn (default "question"), PromptOutputColumn (default
"answer"), LORA_RANK, LOAD_IN_4BIT, NUM_GENERATIONS (completions per prompt), BATCH_SIZE
(prompts per step), MAX_INPUT_LENGTH (prompt tokens), MAX_CONTENT_LENGTH (completion tokens),
MAX_SAMPLES, LEARNING_RATE, WARMUP_STEPS, MAX_STEPS, NUM_EPOCHS, MAX_GRAD_NORM; EVAL_DATASET_PATH or
EVAL_SPLIT (and EVAL_STEPS) for validation during training (eval rewards).
"""

import re
from pathlib import Path

import torch
from datasets import load_dataset, load_from_disk
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

question_column = PromptInputColumn or "question"
answer_column = PromptOutputColumn or "answer"

SYSTEM_PROMPT = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""

# ---- rewards ------------------------------------------------------------------------------
# Each gets the completions of one batch (plus the dataset's columns) and returns one score each.


def completion_text(completion):
    """A completion is a string, or a list of chat messages when the tokenizer has a template."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def extract_xml_answer(text):
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def extract_hash_answer(text):
    return text.split("####")[-1].strip().replace(",", "") if "####" in text else None


def correctness_reward(completions, answer, **kwargs):
    """2.0 when the answer tag holds the right number."""
    return [2.0 if extract_xml_answer(completion_text(c)) == a else 0.0 for c, a in zip(completions, answer)]


def int_reward(completions, **kwargs):
    """0.5 when the answer tag holds an integer."""
    return [0.5 if extract_xml_answer(completion_text(c)).lstrip("-").isdigit() else 0.0 for c in completions]


def strict_format_reward(completions, **kwargs):
    """0.5 for exactly <reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n."""
    pattern = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?$"
    return [0.5 if re.match(pattern, completion_text(c), flags=re.DOTALL) else 0.0 for c in completions]


def soft_format_reward(completions, **kwargs):
    """0.5 for <reasoning>...</reasoning> followed by <answer>...</answer>, spacing aside."""
    pattern = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
    return [0.5 if re.search(pattern, completion_text(c), flags=re.DOTALL) else 0.0 for c in completions]


def count_xml(text):
    """0.125 for each of the four tags in its place, less a little for text after </answer>."""
    score = 0.0
    if text.count("<reasoning>\n") == 1:
        score += 0.125
    if text.count("\n</reasoning>\n") == 1:
        score += 0.125
    if text.count("\n<answer>\n") == 1:
        score += 0.125
        score -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        score += 0.125
        score -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return score


def xmlcount_reward(completions, **kwargs):
    return [count_xml(completion_text(c)) for c in completions]


# ---- model --------------------------------------------------------------------------------
if LOAD_IN_4BIT and not torch.cuda.is_available():
    raise RuntimeError("LOAD_IN_4BIT needs a CUDA GPU; set LOAD_IN_4BIT=false to train on this machine.")
use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
model_kwargs = {"dtype": torch.bfloat16 if use_bf16 else torch.float32}
if LOAD_IN_4BIT:
    from transformers import BitsAndBytesConfig

    model_kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if use_bf16 else torch.float16,
    )
tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
tokenizer.padding_side = "left"                    # generation pads on the left
model = AutoModelForCausalLM.from_pretrained(MODEL_PATH, **model_kwargs)
if LOAD_IN_4BIT:
    model = prepare_model_for_kbit_training(model)

# ---- data ---------------------------------------------------------------------------------
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(name, value):
    """The rows of the dataset file or folder ``value`` (the parameter ``name``)."""
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"{name} {path} does not exist")
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        rows = load_from_disk(str(path))
        if hasattr(rows, "keys"):
            rows = rows["train"] if "train" in rows else next(iter(rows.values()))
    else:
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in FORMATS)
        kinds = {FORMATS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) != 1:
            raise ValueError(f"{name} {path} must be one JSON, JSONL, CSV or Parquet file, "
                             "or a folder of files of one of those kinds")
        if all(p.stat().st_size == 0 for p in files):
            raise ValueError(f"the dataset at {path} ({name}) has no rows")
        kind = kinds.pop()
        try:
            rows = load_dataset(kind, data_files=[str(p) for p in files], split="train")
        except Exception as e:
            raise ValueError(f"{name} {path} could not be read as {kind}: {e}") from e
    for column in (question_column, answer_column):
        if column not in rows.column_names:
            raise ValueError(f"the dataset at {path} ({name}) has no column {column!r}; its columns are "
                             f"{rows.column_names}. Set PromptInputColumn/PromptOutputColumn to match.")
    if len(rows) == 0:
        raise ValueError(f"the dataset at {path} ({name}) has no rows")
    return rows


dataset = load_rows("DATASET_PATH", DATASET_PATH)
if MAX_SAMPLES > 0:
    dataset = dataset.select(range(min(MAX_SAMPLES, len(dataset))))
# Validation during training (the platform evaluates every EVAL_STEPS steps): a held-out file,
# or a seeded fraction of the training data.
eval_dataset = load_rows("EVAL_DATASET_PATH", EVAL_DATASET_PATH) if EVAL_DATASET_PATH else None
if eval_dataset is None and EVAL_SPLIT:
    if round(len(dataset) * EVAL_SPLIT) < 1 or round(len(dataset) * (1 - EVAL_SPLIT)) < 1:
        raise ValueError(f"EVAL_SPLIT={EVAL_SPLIT} of {len(dataset)} rows leaves no row to train on or to evaluate; "
                         "give a fraction that keeps at least one row on each side.")
    split = dataset.train_test_split(test_size=EVAL_SPLIT, seed=42)
    dataset, eval_dataset = split["train"], split["test"]

use_chat = tokenizer.chat_template is not None


def to_prompt(row):
    question = str(row[question_column])
    if use_chat:
        prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    else:
        prompt = f"{SYSTEM_PROMPT}\n\nQuestion: {question}\n"
    return {"prompt": prompt, "answer": extract_hash_answer(str(row[answer_column]))}


def prompt_tokens(row):
    if use_chat:
        return len(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True))
    return len(tokenizer(row["prompt"]).input_ids)


def prepared(rows, name):
    rows = rows.map(to_prompt, remove_columns=rows.column_names)
    rows = rows.filter(lambda row: row["answer"] is not None and prompt_tokens(row) <= MAX_INPUT_LENGTH)
    if len(rows) == 0:
        raise ValueError(f"no row of the dataset ({name}) has both a '####' answer and a prompt within "
                         f"MAX_INPUT_LENGTH={MAX_INPUT_LENGTH} tokens")
    return rows


dataset = prepared(dataset, "DATASET_PATH")
if eval_dataset is not None:
    eval_dataset = prepared(eval_dataset, "EVAL_DATASET_PATH" if EVAL_DATASET_PATH else "EVAL_SPLIT")

# ---- trainer ------------------------------------------------------------------------------
config = GRPOConfig(
    num_generations=NUM_GENERATIONS,                               # completions per prompt
    per_device_train_batch_size=BATCH_SIZE * NUM_GENERATIONS,      # counted in completions
    per_device_eval_batch_size=BATCH_SIZE * NUM_GENERATIONS,
    gradient_accumulation_steps=GRAD_ACCUM_STEPS,
    max_completion_length=MAX_CONTENT_LENGTH,
    learning_rate=LEARNING_RATE,
    warmup_steps=WARMUP_STEPS,
    max_steps=MAX_STEPS,
    num_train_epochs=NUM_EPOCHS,
    max_grad_norm=MAX_GRAD_NORM,
    beta=0.04,                                                     # KL to the base model
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    bf16=use_bf16,
    use_cpu=not torch.cuda.is_available(),
)
peft_config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                         target_modules="all-linear", task_type="CAUSAL_LM")
trainer = GRPOTrainer(
    model=model,
    reward_funcs=[xmlcount_reward, soft_format_reward, strict_format_reward, int_reward, correctness_reward],
    args=config,
    train_dataset=dataset,
    eval_dataset=eval_dataset,
    processing_class=tokenizer,
    peft_config=peft_config,
    callbacks=[callback],
)
