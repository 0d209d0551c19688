"""The GPU check: SFT-Demo and GRPO-Demo through a real worker, in 4-bit and not, on a CUDA GPU.

Prints one JSON object: per run, its state, step time and peak GPU memory, whether its process
was forked by the worker's zygote (`forked`), and the GPU memory in use before and after each
job (a job's memory must be freed when its process exits). At least one job must run in a
forked process: that is the fork-safety check (the zygote never touches CUDA; its children do).
With two or more GPUs it also runs two 2-device jobs on a worker that owns GPUs 0 and 1
(`deepe worker --gpus 0,1`, NCCL): SFT-Demo under DDP, and the same method with FSDP
(`fsdp=True`, a full state dict for the save), each of which must succeed and publish a model.
On a machine without CUDA it prints that it was skipped and exits 0.
Run it as scripts/gpu-check.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FREED_TOLERANCE_MB = 64


def gpu_used_mb() -> float | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return float(out) if out else None


# SFT-Demo with its model sharded over the ranks: what docs/methods.md shows for a model that
# does not fit one device.
FSDP_CONFIG = ('    fsdp=True,                                  # shard the model over the job\'s ranks\n'
               '    fsdp_config={"state_dict_type": "FULL_STATE_DICT"},\n')


def multi_gpu(work: Path, model: Path, data: Path) -> dict[str, object]:
    """Two 2-device jobs, DDP and FSDP, on a worker that owns GPUs 0 and 1."""
    import torch

    from deepe_tasks import EventKind, submit
    from deepe_tasks.fixtures.embedded import WorkerProcess

    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} CUDA device(s); a 2-device job needs 2"}
    store = work / "methods"
    shutil.copytree(ROOT / "method_store", store, dirs_exist_ok=True)
    sft = (ROOT / "deepe_tasks" / "builtin" / "sft-demo.py").read_text()
    (store / "sft-fsdp.py").write_text(sft.replace("    report_to=\"none\",\n", "    report_to=\"none\",\n" + FSDP_CONFIG))
    os.environ["DEEPE_METHOD_STORE"] = str(store)
    out: dict[str, object] = {"runs": []}
    ok = True
    with WorkerProcess({"DEEPE_METHOD_STORE": str(store)}, queues="gpu-check", log_file=work / "worker-ddp.log",
                       extra_args=["--gpus", "0,1"]) as worker:
        worker.wait_ready()
        for method in ("sft-demo", "sft-fsdp"):
            t0 = time.monotonic()
            job = submit(method, {"MODEL_PATH": str(model), "DATASET_PATH": str(data), "MAX_STEPS": 20,
                                  "BATCH_SIZE": 8, "MAX_SEQ_LENGTH": 128, "LORA_RANK": 8}, gpus=2)
            state = job.wait(timeout=240)
            info = job.info()
            events = list(job.events())
            started = [e for e in events if e.kind is EventKind.STARTED]
            steps = [e.step for e in events if e.kind is EventKind.LOG and "loss" in e.metrics]
            run = {"method": method, "gpus": 2, "state": state.value, "error": info.get("error"),
                   "wall_s": round(time.monotonic() - t0, 1), "world_size": started[-1].metrics.get("world_size")
                   if started else None, "one_log_per_step": steps == list(range(1, len(steps) + 1)),
                   "step_time_s": info["metrics"].get("step_time_s"),
                   "model": (Path(info["output_dir"]) / "deepe.json").exists()}
            out["runs"].append(run)  # type: ignore[attr-defined]
            ok = ok and state.value == "succeeded" and run["world_size"] == 2 and run["one_log_per_step"] \
                and run["model"]
    out["ok"] = ok
    return out


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA GPU on this machine; nothing to check"}))
        return 0
    try:
        import bitsandbytes  # noqa: F401

        four_bit = [False, True]
        skipped_4bit = None
    except ImportError as e:
        four_bit, skipped_4bit = [False], f"bitsandbytes is not installed ({e}); pip install -e '.[gpu]'"

    work = Path(tempfile.mkdtemp(prefix="deepe-gpu-check-"))
    os.environ.update({"DEEPE_STORAGE": str(work / "storage"), "DEEPE_METHOD_STORE": str(ROOT / "method_store"),
                       "DEEPE_QUEUE": "gpu-check"})
    from deepe_tasks.fixtures import tiny
    from deepe_tasks.fixtures.embedded import RedisServer, WorkerProcess

    report: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                 "bf16": torch.cuda.is_bf16_supported(), "runs": []}
    if skipped_4bit:
        report["skipped_4bit"] = skipped_4bit
    storage = work / "storage"
    model = tiny.build_model(storage / "base", layers=4, hidden=256)
    sft_data = tiny.write_jsonl(tiny.sft_rows(128), storage / "data/sft.jsonl")
    gsm_data = tiny.write_jsonl(tiny.gsm_rows(32), storage / "data/gsm.jsonl")
    with RedisServer(folder=work / "redis") as server:
        os.environ["DEEPE_REDIS_URL"] = server.url
        from deepe_tasks import EventKind, submit

        with WorkerProcess({}, queues="gpu-check", log_file=work / "worker.log") as worker:
            worker.wait_ready()
            baseline = gpu_used_mb()
            report["gpu_used_mb_before"] = baseline
            ok = True
            for method, data, extra in (
                ("sft-demo", sft_data, {"MAX_STEPS": 20, "BATCH_SIZE": 8, "MAX_SEQ_LENGTH": 128}),
                ("grpo-demo", gsm_data, {"MAX_STEPS": 4, "BATCH_SIZE": 2, "NUM_GENERATIONS": 4,
                                         "MAX_CONTENT_LENGTH": 32, "MAX_INPUT_LENGTH": 256}),
            ):
                for quantized in four_bit:
                    t0 = time.monotonic()
                    job = submit(method, {"MODEL_PATH": str(model), "DATASET_PATH": str(data),
                                          "LOAD_IN_4BIT": quantized, "LORA_RANK": 8, **extra})
                    state = job.wait(timeout=240)
                    info = job.info()
                    events = list(job.events())
                    logs = [e for e in events if e.kind is EventKind.LOG]
                    started = [e for e in events if e.kind is EventKind.STARTED]
                    after = gpu_used_mb()
                    freed = None if baseline is None or after is None else after - baseline <= FREED_TOLERANCE_MB
                    run = {"method": method, "load_in_4bit": quantized, "state": state.value,
                           "error": info.get("error"), "wall_s": round(time.monotonic() - t0, 1),
                           "steps": len([e for e in logs if "loss" in e.metrics]),
                           "step_time_s": info["metrics"].get("step_time_s"),
                           "gpu_peak_mem_mb": info["metrics"].get("gpu_peak_mem_mb"),
                           "gpu_used_mb_after": after, "memory_freed": freed,
                           "forked": bool(started) and started[-1].metrics.get("forked") is True}
                    report["runs"].append(run)  # type: ignore[attr-defined]
                    ok = ok and state.value == "succeeded" and freed is not False
            forked = [r for r in report["runs"] if r["forked"]]  # type: ignore[attr-defined]
        multi = multi_gpu(work, model, sft_data)
        report["multi_gpu"] = multi
        ok = ok and multi.get("ok", True) is True
        report["ok"] = ok and bool(forked)
    print(json.dumps(report, indent=2))
    if not ok:
        print((work / "worker.log").read_text()[-3000:], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
