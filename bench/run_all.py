"""Run the benchmarks and write their figures to one JSON file (bench/results.json).

`--smoke` runs each in its smoke size instead (seconds each: does it still work?) and writes
nothing. fleet.py, partition.py and nemesis.py are run on their own (bench/README.md);
tests/test_bench_smoke.py runs every script's smoke.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["events.py", "callback_overhead.py", "time_to_first_step.py", "ddp_first_step.py", "dispatch.py", "scaling.py",
           "api_followers.py", "replication.py", "storage.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="each in its smoke size; write no results.json")
    smoke = parser.parse_args().smoke
    results, failed = [], []
    for script in SCRIPTS:
        proc = subprocess.run([sys.executable, str(HERE / script), *(["--smoke"] if smoke else [])],
                              capture_output=True, text=True, cwd=HERE)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            failed.append(script)
            print(f"{script} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1]))
        print(lines[-1], flush=True)
    if not smoke:
        out = HERE / "results.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
