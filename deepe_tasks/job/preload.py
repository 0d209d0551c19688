"""What a job process imports before it is handed a job (a zygote's spares, or a job process
started for its job), so that the job starts training at once."""

from __future__ import annotations

import gc
import importlib

WARM_IMPORTS = ("torch", "transformers", "datasets", "peft", "trl")
# transformers, peft and trl import a name's module when it is first used: these are the ones
# methods use (GRPOTrainer alone is about 0.4 s), and the architectures of the usual base models.
WARM_NAMES = {
    "transformers": ("AutoModelForCausalLM", "AutoTokenizer", "Trainer", "TrainingArguments", "TrainerCallback"),
    "peft": ("LoraConfig", "get_peft_model", "prepare_model_for_kbit_training"),
    "trl": ("SFTConfig", "SFTTrainer", "GRPOConfig", "GRPOTrainer"),
    "transformers.models.llama": ("LlamaForCausalLM",),
    "transformers.models.qwen2": ("Qwen2ForCausalLM",),
    "transformers.models.mistral": ("MistralForCausalLM",),
}


def warm_up() -> None:
    """Import what methods use, so that a warm job process starts training at once.

    Then freeze what was imported out of the garbage collector's reach: a full collection in
    the job process (accelerate runs one as training starts) would otherwise walk the millions
    of objects the training stack made, about 0.2 s here; and a forked job process then writes
    nothing to the pages it shares with its zygote when it collects (Python's gc docs say so).
    """
    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for module_name, names in WARM_NAMES.items():
        try:
            module = importlib.import_module(module_name)
            for attr in names:
                getattr(module, attr)
        except (ImportError, AttributeError):  # an older or newer library without it: it loads when used
            pass
    gc.freeze()
