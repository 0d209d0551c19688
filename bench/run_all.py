"""Run every benchmark and write their figures to one JSON file (bench/results.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["events.py", "callback_overhead.py", "time_to_first_step.py", "ddp_first_step.py", "dispatch.py", "scaling.py"]


def main() -> int:
    results, failed = [], []
    for script in SCRIPTS:
        proc = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True, cwd=HERE)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            failed.append(script)
            print(f"{script} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1]))
        print(lines[-1])
    out = HERE / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
