"""What a method asks of the machine that runs it: settings that need a CUDA GPU, found without
running anything, so that a machine without one is warned before it fails.

TRL's configs (`SFTConfig`, `GRPOConfig`, …) turn bf16 on unless told otherwise, and transformers
then refuses to start without a bf16 GPU ("Your setup doesn't support bf16/gpu"); `bf16=True`,
`fp16=True` and `load_in_4bit=True` need one too, and so does `LOAD_IN_4BIT=true`.
"""

from __future__ import annotations

import ast
import os
import shutil
from typing import Any

GPU_ONLY = {"bf16": "bf16=True", "fp16": "fp16=True", "load_in_4bit": "load_in_4bit=True"}
# TRL's configs, for a file that reaches them as `trl.SFTConfig`; any `…Config` imported from trl counts too.
TRL_CONFIGS = frozenset({"SFTConfig", "GRPOConfig", "DPOConfig", "KTOConfig", "RewardConfig", "RLOOConfig",
                         "DistillationConfig", "ORPOConfig", "CPOConfig", "PPOConfig", "OnlineDPOConfig",
                         "GKDConfig", "PRMConfig", "XPOConfig", "NashMDConfig", "BCOConfig"})
BF16_FIX = ("Pass bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported() to the config, as the demo "
            "methods do, or use_cpu=True to train on the CPU.")
LOAD_IN_4BIT_FIX = ("LOAD_IN_4BIT=true needs a CUDA GPU, which this machine lacks: set LOAD_IN_4BIT=false to train "
                    "here, or run the job on GPU workers.")


def has_cuda() -> bool:
    """Whether this machine has an NVIDIA GPU, without importing torch."""
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def _name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _trl_configs(nodes: list[ast.AST]) -> set[str]:
    """The `…Config` names the file imports from trl, and TRL's own."""
    imported = {a.asname or a.name for n in nodes if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0]
                == "trl" for a in n.names if a.name.endswith("Config")}
    return imported | TRL_CONFIGS


def _bf16_default(node: ast.Call) -> bool:
    """A config call that leaves bf16 to TRL's default: no `bf16=`, no `use_cpu=` (other than
    False) and no `**kwargs` that might hold either."""
    for kw in node.keywords:
        if kw.arg is None or kw.arg == "bf16":
            return False
        if kw.arg == "use_cpu" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
            return False
    return True


def gpu_settings(nodes: list[ast.AST]) -> list[tuple[int, str]]:
    """(line, message) for each setting that needs a CUDA GPU, for a machine that has none."""
    # A setting under an `if` is taken to be guarded (`if LOAD_IN_4BIT:`, `if torch.cuda…`).
    guarded = {id(n) for node in nodes if isinstance(node, ast.If) for s in node.body + node.orelse
               for n in ast.walk(s)}
    configs = _trl_configs(nodes)
    out = []
    for node in nodes:
        if not isinstance(node, ast.Call) or id(node) in guarded:
            continue
        for kw in node.keywords:
            if kw.arg in GPU_ONLY and isinstance(kw.value, ast.Constant) and kw.value.value is True:
                out.append((node.lineno, f"Line {node.lineno} sets {GPU_ONLY[kw.arg]}, which needs a CUDA GPU; this "
                                         "machine has none, so a local run fails. Make it depend on "
                                         "torch.cuda.is_available(), as the demo methods do."))
        if _name(node) in configs and _bf16_default(node):
            out.append((node.lineno, f"Line {node.lineno} builds {_name(node)}(…) without bf16= or use_cpu=, so TRL "
                                     "turns bf16 on, which needs a GPU with bf16; this machine has none, so a run "
                                     f"here fails (\"Your setup doesn't support bf16/gpu\"). {BF16_FIX}"))
    return out


def params_need_gpu(params: dict[str, Any], gpu: bool | None = None) -> list[str]:
    """Warnings for parameters that need a CUDA GPU; ``gpu``: whether the machine that runs the job
    has one (default: this one)."""
    if not params.get("LOAD_IN_4BIT") or (has_cuda() if gpu is None else gpu):
        return []
    return ["LOAD_IN_4BIT=true asks for a 4-bit base model (bitsandbytes), which needs a CUDA GPU, and this machine "
            "has none: building the model fails here, or the method trains without it. Set LOAD_IN_4BIT=false to "
            "train on this machine, or run the job on GPU workers."]
