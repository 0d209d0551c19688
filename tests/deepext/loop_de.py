"""A DeepExtension-style method whose flags are declared in a loop, in upper case, and parsed strictly."""

import argparse

from train_callback import LevelEnum, LogEnum, TrainCallback, write_log

parser = argparse.ArgumentParser()
for name, kind in (("MODEL_PATH", str), ("DATASET_PATH", str), ("LORA_RANK", int), ("BATCH_SIZE", int),
                   ("LEARNING_RATE", float), ("MAX_SEQ_LENGTH", int)):
    parser.add_argument(f"--{name}", type=kind, required=True)
parser.add_argument("--MAX_STEPS", type=int, default=10)  # optional: a given MAX_STEPS must still reach it
parser.add_argument("--input-train-name", dest="prompt", default="instruction")
parser.add_argument("--output-train-name", dest="answer", default="output")
parser.add_argument("--train_id")
parser.add_argument("--seq", type=int)
args = parser.parse_args()  # strict: an argument it does not declare would end the run

callback = TrainCallback(1, args.train_id, args.seq)
write_log(LevelEnum.INFO, LogEnum.ActualParams, f"MAX_STEPS={args.MAX_STEPS}", args.train_id, args.seq, None)
#============ from here add your own train code
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

tokenizer = AutoTokenizer.from_pretrained(args.MODEL_PATH)
model = AutoModelForCausalLM.from_pretrained(args.MODEL_PATH)
dataset = load_dataset("json", data_files=args.DATASET_PATH, split="train")
dataset = dataset.map(lambda row: {"prompt": row[args.prompt] + "\n", "completion": row[args.answer]},
                      remove_columns=dataset.column_names)
trainer = SFTTrainer(
    model=model,
    args=SFTConfig(output_dir="out", max_steps=args.MAX_STEPS, per_device_train_batch_size=args.BATCH_SIZE,
                   learning_rate=args.LEARNING_RATE, max_length=args.MAX_SEQ_LENGTH, logging_steps=1,
                   report_to="none", use_cpu=True),
    train_dataset=dataset,
    processing_class=tokenizer,
    peft_config=LoraConfig(r=args.LORA_RANK, target_modules="all-linear", task_type="CAUSAL_LM"),
    callbacks=[callback],
)
#============ end here with your own train code


def training():
    trainer.train()
    trainer.save_model("out/final")


if __name__ == "__main__":
    training()
