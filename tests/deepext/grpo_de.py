"""A DeepExtension-style custom method, written for deepe's tests to DeepExtension's interface."""

import argparse

from train_callback import LevelEnum, LogEnum, TrainCallback, write_log

parser = argparse.ArgumentParser()
parser.add_argument('--model_path', type=str, required=True)
parser.add_argument('--max_seq_length', type=int, required=True)
parser.add_argument('--lora_rank', type=int, required=True)
parser.add_argument('--load_in_4bit', type=bool, required=True)
parser.add_argument('--dataset_path', type=str, required=True)
parser.add_argument('--max_input_length', type=int, required=True)
parser.add_argument('--max_content_length', type=int, required=True)
parser.add_argument('--max_samples', type=int, required=True)
parser.add_argument('--num_generations', type=int, required=True)
parser.add_argument('--max_grad_norm', type=float, required=True)
parser.add_argument('--output_dir', type=str, required=True)
parser.add_argument('--max_steps', type=int, required=True)
parser.add_argument('--batch_size', type=int, required=True)
parser.add_argument('--grad_accum_steps', type=int, required=True)
parser.add_argument('--learning_rate', type=float, required=True)
parser.add_argument('--warmup_steps', type=int, required=True)
parser.add_argument('--input_train_name', type=str, required=True)
parser.add_argument('--output_train_name', type=str, required=True)
parser.add_argument('--train_id', type=str, required=True)
parser.add_argument('--seq', type=int, required=True)
parser.add_argument('--model_name', type=str, required=True)
args, _unknown = parser.parse_known_args()

MODEL_PATH = args.model_path
DATASET_PATH = args.dataset_path
OUTPUT_DIR = args.output_dir
MAX_STEPS = args.max_steps
BATCH_SIZE = args.batch_size
LEARNING_RATE = args.learning_rate
MAX_SEQ_LENGTH = args.max_seq_length
LORA_RANK = args.lora_rank
LOAD_IN_4BIT = args.load_in_4bit
InputTrainName = args.input_train_name
OutputTrainName = args.output_train_name
callback = TrainCallback(1, args.train_id, args.seq)
assert not LOAD_IN_4BIT, "false must arrive as false"
write_log(LevelEnum.INFO, LogEnum.ActualParams, f"steps={MAX_STEPS} seq={args.seq} model={args.model_name}",
          args.train_id, args.seq, {"max_steps": MAX_STEPS})
#============ from here add your own train code
import re

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

write_log(LevelEnum.INFO, LogEnum.InitializingModel, MODEL_PATH, args.train_id, args.seq, None)
tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained(MODEL_PATH)
write_log(LevelEnum.INFO, LogEnum.HandleWithDataset, DATASET_PATH, args.train_id, args.seq, None)
dataset = load_dataset("json", data_files=DATASET_PATH, split="train")
dataset = dataset.map(lambda row: {"prompt": row[InputTrainName], "answer": row[OutputTrainName]},
                      remove_columns=dataset.column_names)


def number_reward(completions, answer, **kwargs):
    return [1.0 if re.search(r"\d", c) else 0.0 for c in completions]


trainer = GRPOTrainer(
    model=model,
    reward_funcs=[number_reward],
    args=GRPOConfig(output_dir="outputs", max_steps=MAX_STEPS, per_device_train_batch_size=2,
                    num_generations=2, max_completion_length=8, logging_steps=1, report_to="none",
                    learning_rate=LEARNING_RATE, use_cpu=True),
    train_dataset=dataset,
    processing_class=tokenizer,
    callbacks=[callback],
)
#============ end here with your own train code


def training():
    trainer.train()
    trainer.save_model(OUTPUT_DIR)


if __name__ == "__main__":
    training()
