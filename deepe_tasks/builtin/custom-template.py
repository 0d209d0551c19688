"""My method: one line that `deepe methods list` shows. Describe what it trains.

How to use this template:
  1. `deepe methods new custom01` copies it to custom01.py (or copy it by hand).
  2. Paste your training code between the two marker lines below.
  3. Map your script's settings onto the parameters: use MODEL_PATH, DATASET_PATH, LORA_RANK, ...
     instead of hard-coded values. Custom keys you submit arrive in `params`.
  4. Pass `callbacks=[callback]` to your trainer, so every log line and metric reaches deepe.
  5. Define `model`, `tokenizer` and `trainer`. Do NOT call `trainer.train()`, `save_pretrained`,
     `save_model` or `push_to_hub`: the platform trains (with resume and cancel) and saves the
     model and tokenizer atomically to OUTPUT_DIR, with a deepe.json manifest.
  6. Test it with `deepe run-local custom01 -p MODEL_PATH=... -p DATASET_PATH=...`, or with a copy
     of run_local_train_test_template.py; then `deepe submit custom01 -p ...`.
"""

# ---- Parameters ---------------------------------------------------------------------------
# The platform injects `params` (every parameter, custom keys included: params["my_key"]) and
# `callback` before this file runs. The lines below give each parameter its own name.
MODEL_PATH = params.MODEL_PATH                  # base model folder
DATASET_PATH = params.DATASET_PATH              # dataset file or folder (JSON, JSONL, CSV, Parquet)
OUTPUT_DIR = params.OUTPUT_DIR                  # where the platform saves the result; don't write there
MAX_SEQ_LENGTH = params.MAX_SEQ_LENGTH          # tokens per training sequence
LORA_RANK = params.LORA_RANK                    # LoRA rank r
LOAD_IN_4BIT = params.LOAD_IN_4BIT              # 4-bit NF4 base weights (needs a CUDA GPU)
MAX_INPUT_LENGTH = params.MAX_INPUT_LENGTH      # prompt tokens (generation methods such as GRPO)
MAX_CONTENT_LENGTH = params.MAX_CONTENT_LENGTH  # completion tokens (generation methods)
MAX_SAMPLES = params.MAX_SAMPLES                # rows to keep; 0 or -1 keeps all
NUM_GENERATIONS = params.NUM_GENERATIONS        # completions per prompt (GRPO)
MAX_GRAD_NORM = params.MAX_GRAD_NORM            # gradient clipping
MAX_STEPS = params.MAX_STEPS                    # optimizer steps; -1 trains NUM_EPOCHS epochs
NUM_EPOCHS = params.NUM_EPOCHS                  # epochs when MAX_STEPS is -1
BATCH_SIZE = params.BATCH_SIZE                  # per-device batch size
GRAD_ACCUM_STEPS = params.GRAD_ACCUM_STEPS      # effective batch = BATCH_SIZE * GRAD_ACCUM_STEPS
LEARNING_RATE = params.LEARNING_RATE            # peak learning rate
WARMUP_STEPS = params.WARMUP_STEPS              # linear warm-up steps
PromptInputColumn = params.PromptInputColumn or "instruction"  # the prompt column
PromptOutputColumn = params.PromptOutputColumn or "output"     # the answer column
EVAL_DATASET_PATH = params.EVAL_DATASET_PATH    # held-out data, or None: pass eval_dataset= to the
EVAL_SPLIT = params.EVAL_SPLIT                  # trainer and the platform evaluates it every
EVAL_STEPS = params.EVAL_STEPS                  # EVAL_STEPS steps (None: 10 times a run)

#============ from here add your own train code

# model = ...       (for example AutoModelForCausalLM.from_pretrained(MODEL_PATH))
# tokenizer = ...   (for example AutoTokenizer.from_pretrained(MODEL_PATH))
# trainer = ...     (for example SFTTrainer(..., callbacks=[callback]))

#============ end here with your own train code
