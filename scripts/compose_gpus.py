"""Write docker-compose.gpus.yml: one worker service per GPU (or per group of GPUs), each with its own devices.

Docker gives every replica of a scaled service the same GPU (`--scale worker=4` with
`count: 1` puts four workers on one device; nvidia-container-toolkit#521), so a host with N
GPUs gets N services instead, `worker-gpu0` … each reserving its own `device_ids`:

    python scripts/compose_gpus.py --gpus 0,1,2,3        # or --gpus all (reads nvidia-smi -L)
    docker compose -f docker-compose.yml -f docker-compose.gpus.yml --env-file config/deepe.env up -d

The override sets the plain `worker` service to 0 replicas rather than hiding it behind a
profile: `up` then also stops and removes a plain worker left running from a single-GPU start,
which would otherwise go on using a GPU that a `worker-gpuN` now reserves.

Each container sees only the GPU it reserved, and sees it as device 0 (nvidia-container-toolkit
renumbers the devices it exposes), so each worker runs with `--gpus 0`: CUDA_VISIBLE_DEVICES=0
for its jobs, whatever DEEPE_GPUS the env file sets for hosts without this override.

For multi-device jobs, `--per-worker N` gives each worker N GPUs (`--gpus 0,…,N-1` inside its
container), so it runs jobs of up to N devices: on a 4-GPU host, `--per-worker 1` runs four
1-device jobs at a time, and `--per-worker 4` one job of up to 4 devices.
"""

from __future__ import annotations

import argparse
import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def gpu_list(spec: str) -> list[str]:
    """GPU indexes from "0,1,3" or "all" (every GPU that `nvidia-smi -L` lists)."""
    if spec == "all":
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise SystemExit(f"--gpus all needs nvidia-smi, which failed ({e}); list the GPUs instead: --gpus 0,1") from e
        found = re.findall(r"^GPU (\d+):", listed, flags=re.MULTILINE)
        if not found:
            raise SystemExit("--gpus all: nvidia-smi -L lists no GPU; list them instead: --gpus 0,1")
        return found
    gpus = [g.strip() for g in spec.split(",") if g.strip()]
    bad = [g for g in gpus if not g.isdigit()]
    if bad or not gpus or len(set(gpus)) != len(gpus):
        raise SystemExit(f"--gpus {spec!r} is not a list of distinct GPU indexes; give e.g. --gpus 0,1,2,3 or all.")
    return gpus


def override(base: dict[str, Any], gpus: list[str], per_worker: int = 1) -> dict[str, Any]:
    """The override file: the plain worker at 0 replicas, and a worker service per GPU (or per
    ``per_worker`` GPUs)."""
    if per_worker < 1 or len(gpus) % per_worker:
        raise SystemExit(f"{len(gpus)} GPUs do not split into workers of {per_worker}; give --per-worker a divisor "
                         f"of {len(gpus)}.")
    worker = base["services"]["worker"]
    services: dict[str, Any] = {"worker": {"deploy": {"replicas": 0}}}
    for i in range(0, len(gpus), per_worker):
        group = gpus[i:i + per_worker]
        name = f"gpu{group[0]}" if per_worker == 1 else f"gpu{'-'.join(group)}"
        # Its GPUs are devices 0…N-1 in the container (see above); the node name tells them apart.
        inside = ",".join(str(d) for d in range(per_worker))
        service = copy.deepcopy(worker)
        service["command"] = [*worker["command"], "--name", f"{name}@%h", "--gpus", inside]
        service["deploy"] = {"replicas": 1, "resources": {"reservations": {"devices": [
            {"driver": "nvidia", "device_ids": group, "capabilities": ["gpu"]}]}}}
        services[f"worker-{name}"] = service
    return {"services": services}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", required=True, help='GPU indexes, "0,1,2,3", or "all".')
    parser.add_argument("--per-worker", type=int, default=1,
                        help="GPUs per worker: it runs jobs of up to this many devices (default 1).")
    parser.add_argument("--base", type=Path, default=ROOT / "docker-compose.yml")
    parser.add_argument("--out", type=Path, default=ROOT / "docker-compose.gpus.yml")
    args = parser.parse_args(argv)
    gpus = gpu_list(args.gpus)
    made = override(yaml.safe_load(args.base.read_text()), gpus, args.per_worker)
    text = yaml.safe_dump(made, sort_keys=False)
    args.out.write_text(f"# Written by scripts/compose_gpus.py --gpus {','.join(gpus)} --per-worker {args.per_worker}: "
                        f"one worker per {args.per_worker} GPU(s).\n{text}")
    print(f"wrote {args.out}: workers {', '.join(s for s in made['services'] if s != 'worker')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
