"""The nemesis, long: many seeded runs of real jobs under random faults, and the invariants.

Each run (tests/nemesis/harness.py) starts a private Redis with its AOF fsynced at every write
and workers on network hosts of their own (needs root: `ip netns`), submits short real SFT
jobs (some cancelled, some cancelled with a save, a merge or two), and meanwhile injects
faults at random moments and for random lengths: link cuts, slow and lossy links (`tc`),
Redis paused and restarted, job processes, zygotes and whole workers SIGKILLed (a killed
worker is replaced), whole worker trees SIGSTOPped. Afterwards it checks that every job
ended once, no worker idled while jobs waited, one model per job, every event once, and
nothing left running. The goal is 0 violations over at least 200 injected faults.

Prints one JSON object (runs, faults injected by kind, violations by invariant, each
violation's detail), then a table; exits 1 if any invariant was broken.

    python bench/nemesis.py [--runs 10] [--faults 25] [--seed 1] [--minutes 90] [--workers 3]
    python bench/nemesis.py --smoke     # 1 run, 2 faults, 2 jobs, 2 workers, a 10 s window

Where network hosts cannot be made (no root, no `ip netns`), `--smoke` prints a JSON object
with `skipped` (the reason) and exits 0; a full run exits with the reason.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import report, smoke_flag


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs, each with a fresh cluster (default 10)")
    parser.add_argument("--faults", type=int, default=25, help="faults per run (default 25)")
    parser.add_argument("--seed", type=int, default=1, help="the first run's seed; run n has seed + n (default 1)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="start no new run after this many minutes (default: no limit)")
    parser.add_argument("--workers", type=int, default=3, help="workers per run (default 3)")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per run (default: one per 3 s of the window)")
    parser.add_argument("--window", type=float, default=None,
                        help="seconds over which a run's faults are spread (default: 6 per fault, at least 60)")
    parser.add_argument("--kinds", default=None,
                        help="a comma-separated subset of the fault kinds, to search one region (default: all)")
    parser.add_argument("--claim-share", type=float, default=0.35,
                        help="of the faults that can wait for a worker's next claim, how many do (default 0.35)")
    parser.add_argument("--merges", type=int, default=2, help="merges per run (default 2)")
    smoke_flag(parser, "1 run, 2 faults, 2 jobs, no merge, 2 workers, a 10 s window")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.faults, args.jobs, args.merges, args.workers, args.window = 1, 2, 2, 0, 2, 10.0
    return args


def skipped(reason: str) -> int:
    """A smoke where the nemesis cannot run: it says why, and passes."""
    report("nemesis", {"skipped": reason}, smoke=True)
    return 0


def table(runs: list[dict[str, Any]], kinds: dict[str, Counter[str]], invariants: Counter[str]) -> str:
    lines = [f"{len(runs)} runs, {sum(r['faults_injected'] for r in runs)} faults injected, "
             f"{sum(r['jobs'] for r in runs)} jobs, {sum(invariants.values())} invariant violations",
             "", f"{'fault kind':<15}{'injected':>9}{'skipped':>9}"]
    lines += [f"{k:<15}{c['injected']:>9}{c['skipped']:>9}" for k, c in kinds.items()]
    lines += ["", f"{'invariant':<15}{'violations':>10}"]
    lines += [f"{k:<15}{v:>10}" for k, v in invariants.items()]
    lines += ["", f"{'seed':>6}{'faults':>8}{'jobs':>6}{'violations':>12}{'seconds':>9}  outcomes"]
    lines += [f"{r['seed']:>6}{r['faults_injected']:>8}{r['jobs']:>6}{sum(r['violations_by_invariant'].values()):>12}"
              f"{r['duration_s']:>9.0f}  {r['outcomes']}" for r in runs]
    return "\n".join(lines)


def main() -> int:
    args = arguments()
    from tests.netns import available

    reason = available()
    if reason and args.smoke:
        return skipped(reason)
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    work = Path(tempfile.mkdtemp(prefix="deepe-bench-nemesis-"))
    storage = work / "storage"
    os.environ.update({"DEEPE_STORAGE": str(storage), "DEEPE_METHOD_STORE": str(work / "methods"),
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    from deepe_tasks.fixtures import tiny
    from tests.helpers import SLOW_METHOD
    from tests.nemesis.faults import KINDS
    from tests.nemesis.harness import Config, Unavailable, run
    from tests.nemesis.workload import write_method

    (work / "methods").mkdir(parents=True)
    method = write_method(work / "methods", "nemesis", SLOW_METHOD)
    model = tiny.cached_model(storage / "base" / "tiny-llama")
    data = tiny.write_jsonl(tiny.sft_rows(64), storage / "data" / "colors.jsonl")
    kinds = tuple(args.kinds.split(",")) if args.kinds else KINDS
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"unknown fault kinds {sorted(unknown)}; choose among {', '.join(KINDS)}.")
    window = args.window or max(60.0, 6.0 * args.faults)
    jobs = args.jobs or max(10, int(window / 3))
    deadline = None if args.minutes is None else time.monotonic() + args.minutes * 60
    runs: list[dict[str, Any]] = []
    by_kind: dict[str, Counter[str]] = {}
    broken: Counter[str] = Counter()
    for n in range(args.runs):
        if deadline is not None and runs and time.monotonic() > deadline:
            break
        config = Config(seed=args.seed + n, workers=args.workers, jobs=jobs, faults=args.faults, window_s=window,
                        merges=args.merges, kinds=kinds, claim_share=args.claim_share)
        try:
            result = run(config, work / f"run-{n}", storage, model, data, method)
        except Unavailable as e:
            if args.smoke:
                return skipped(str(e))
            raise SystemExit(f"cannot run: {e}") from e
        print(result.table(), file=sys.stderr, flush=True)
        summary = result.summary()
        runs.append(summary)
        for kind, counts in summary["faults_by_kind"].items():
            by_kind.setdefault(kind, Counter()).update(counts)
        broken.update(summary["violations_by_invariant"])
    report("nemesis", {
        "runs": len(runs), "faults_injected": sum(r["faults_injected"] for r in runs),
        "faults_by_kind": {k: dict(c) for k, c in by_kind.items()},
        "violations_by_invariant": dict(broken), "violations": sum(broken.values()),
        "jobs": sum(r["jobs"] for r in runs), "work": str(work),
        "per_run": [{k: r[k] for k in ("seed", "faults_injected", "jobs", "outcomes", "duration_s", "violations",
                                       "notes")} for r in runs],
    }, smoke=args.smoke)
    print(table(runs, by_kind, broken))
    return 1 if sum(broken.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
