"""Tiny local models and datasets, for `deepe demo`, the tests and the benchmarks.

Nothing here downloads anything: the tokenizer is trained in well under a second on the
dataset's own text, and the model is a randomly initialised few-layer Llama.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

COLORS = {
    "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red",
    "sun": "yellow", "orange": "orange", "plum": "purple", "cloud": "grey", "rose": "pink",
}
GSM_PROBLEMS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7", 7),
    ("A box holds 6 eggs. How many eggs are in 2 boxes?", "6 * 2 = 12", 12),
    ("Sara had 10 sweets and ate 3. How many are left?", "10 - 3 = 7", 7),
    ("There are 5 birds and 4 more arrive. How many birds are there?", "5 + 4 = 9", 9),
    ("A pen costs 2 dollars. How much do 5 pens cost?", "2 * 5 = 10", 10),
    ("Ann reads 8 pages a day. How many pages in 3 days?", "8 * 3 = 24", 24),
    ("A class has 12 girls and 9 boys. How many pupils?", "12 + 9 = 21", 21),
    ("Bob splits 20 cards among 4 friends. How many each?", "20 / 4 = 5", 5),
]


def sft_rows(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """A small learnable instruction dataset: the colour of common things."""
    rng = random.Random(seed)
    items = list(COLORS.items())
    rows = []
    for i in range(n):
        thing, color = items[i % len(items)] if i < len(items) else rng.choice(items)
        rows.append({"instruction": f"What colour is the {thing}?", "output": f"The {thing} is {color}."})
    return rows


def gsm_rows(n: int = 16) -> list[dict[str, str]]:
    """A GSM8K-style dataset: the answer ends with '#### <number>'."""
    return [{"question": q, "answer": f"{work}\n#### {result}"}
            for q, work, result in (GSM_PROBLEMS[i % len(GSM_PROBLEMS)] for i in range(n))]


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _corpus(extra: list[str]) -> list[str]:
    text = [f"{r['instruction']} {r['output']}" for r in sft_rows(len(COLORS))]
    text += [f"{r['question']} {r['answer']}" for r in gsm_rows(len(GSM_PROBLEMS))]
    text += ["<reasoning> </reasoning> <answer> </answer> Respond in the following format:"]
    text += [" ".join(str(i) for i in range(100))]
    return text + extra


def build_tokenizer(path: Path, extra_text: list[str] | None = None, vocab_size: int = 400) -> Any:
    """Train a byte-level BPE tokenizer on the toy corpus and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(extra_text or []), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))
    return fast


def build_model(path: Path, layers: int = 2, hidden: int = 64, seed: int = 0,
                extra_text: list[str] | None = None) -> Path:
    """A few-layer Llama with a locally trained tokenizer, saved to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    tok = build_tokenizer(path, extra_text)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path
