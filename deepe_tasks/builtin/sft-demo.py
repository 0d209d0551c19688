"""SFT-Demo: supervised fine-tuning with a LoRA adapter, loss on the answer tokens only.

Parameters: MODEL_PATH, DATASET_PATH, PromptInputColumn (default "instruction"),
PromptOutputColumn (default "output"), MAX_SEQ_LENGTH, LORA_RANK, LOAD_IN_4BIT, MAX_SAMPLES,
BATCH_SIZE, GRAD_ACCUM_STEPS, LEARNING_RATE, WARMUP_STEPS, MAX_STEPS, NUM_EPOCHS,
MAX_GRAD_NORM; EVAL_DATASET_PATH or EVAL_SPLIT (and EVAL_STEPS) for validation during training. The platform injects them, with `params` and `callback`, trains and saves.
"""

from pathlib import Path

import torch
from datasets import load_dataset, load_from_disk
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

input_column = PromptInputColumn or "instruction"   # the prompt
output_column = PromptOutputColumn or "output"      # the answer the model learns to give

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
        rows = load_from_disk(str(path))            # a folder written by save_to_disk
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
    for column in (input_column, output_column):
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
has_input = "input" in dataset.column_names and input_column != "input"
use_chat = tokenizer.chat_template is not None


def to_prompt_completion(row):
    prompt = str(row[input_column])
    if has_input and row["input"]:
        prompt += "\n\n" + str(row["input"])
    answer = str(row[output_column])
    if use_chat:  # conversational: the tokenizer's chat template frames it
        return {"prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": answer}]}
    return {"prompt": prompt + "\n", "completion": answer}


dataset = dataset.map(to_prompt_completion, remove_columns=dataset.column_names)
if eval_dataset is not None:
    eval_dataset = eval_dataset.map(to_prompt_completion, remove_columns=eval_dataset.column_names)

# ---- trainer ------------------------------------------------------------------------------
config = SFTConfig(
    max_length=MAX_SEQ_LENGTH,                  # sequences are cut here
    completion_only_loss=True,                  # the loss is on the answer tokens only
    per_device_train_batch_size=BATCH_SIZE,
    gradient_accumulation_steps=GRAD_ACCUM_STEPS,
    learning_rate=LEARNING_RATE,
    warmup_steps=WARMUP_STEPS,
    max_steps=MAX_STEPS,                        # -1: train NUM_EPOCHS epochs
    num_train_epochs=NUM_EPOCHS,
    max_grad_norm=MAX_GRAD_NORM,
    logging_steps=1,
    save_strategy="no",                         # the platform checkpoints and saves the model
    report_to="none",
    bf16=use_bf16,
    use_cpu=not torch.cuda.is_available(),
)
peft_config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                         target_modules="all-linear", task_type="CAUSAL_LM")
trainer = SFTTrainer(
    model=model,
    args=config,
    train_dataset=dataset,
    eval_dataset=eval_dataset,
    processing_class=tokenizer,
    peft_config=peft_config,
    callbacks=[callback],
)
if len(trainer.train_dataset) == 0:
    raise ValueError(f"no example of the dataset keeps any answer tokens within MAX_SEQ_LENGTH="
                     f"{MAX_SEQ_LENGTH} tokens; raise MAX_SEQ_LENGTH or shorten the prompts")
