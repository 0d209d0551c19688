"""Test a method on this machine before you submit it: no queue, no Redis, the worker's runner.

Copy this file to run_local_train_test.py, fill in the values below (every 'your-...'
placeholder: one left in is refused, never taken as a path), then run:
    python3 run_local_train_test.py
It runs the method in this process through the same runner the workers use, prints every
event as a line, and checks that the model, the tokenizer and deepe.json were written. A wrong
method or parameter is one FAILED: line on stderr (exit 2), a failed run one FAILED: line (exit 1).
"""

import sys

from deepe_tasks.ui.local import run_local_script

# The method to test: its name in the method store (custom01), or its file (custom01.py, found
# here, beside this script, or in the method store).
METHOD_FILE = 'your-custom-file.py'

PARAMS = {
    "MODEL_PATH": 'your-model_path',       # a local model folder
    "DATASET_PATH": 'your-dataset_path',   # a JSON, JSONL, CSV or Parquet file, or a folder
    "OUTPUT_DIR": 'your-output_dir',       # where the model is saved (inside DEEPE_STORAGE)
    "MAX_SEQ_LENGTH": 512,
    "LORA_RANK": 8,
    "LOAD_IN_4BIT": False,
    "MAX_INPUT_LENGTH": 256,
    "MAX_CONTENT_LENGTH": 128,
    "MAX_SAMPLES": 0,
    "NUM_GENERATIONS": 4,
    "MAX_GRAD_NORM": 1.0,
    "MAX_STEPS": 5,
    "BATCH_SIZE": 2,
    "GRAD_ACCUM_STEPS": 1,
    "LEARNING_RATE": 2e-4,
    "WARMUP_STEPS": 0,
    "PromptInputColumn": "instruction",
    "PromptOutputColumn": "output",
}

if __name__ == "__main__":
    sys.exit(run_local_script(METHOD_FILE, PARAMS, __file__))
