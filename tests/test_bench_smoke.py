"""Every benchmark in bench/ still runs: each script in its smoke size (`--smoke`, seconds to a
minute or so), checked for its exit status and the keys of the JSON object it prints. The
figures of a smoke mean nothing; bench/README.md has the real ones.

Each script starts its own private Redis and storage (bench/common.py), so it gets none of this
session's DEEPE_* settings, and its temporary folders go under the test's own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parent.parent / "bench"
NOT_BENCHMARKS = {"common.py", "bare_app.py", "run_all.py"}  # helpers, and the runner of the others
TIMEOUT = 300  # seconds; the ones that start many workers or a cluster of network hosts get LONG
LONG = 540
COMMON = {"bench", "smoke", "machine", "at"}
# Per script: its `bench` name and the top-level keys its JSON must have.
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "events.py": ("events", {"ours_events_per_s", "baseline_xadd_per_s", "ratio", "follower_lag_p50_ms",
                             "follower_lag_p99_ms", "events"}),
    "callback_overhead.py": ("callback_overhead", {"ours_median_step_s", "baseline_median_step_s", "ratio",
                                                   "ratio_each_round", "steps", "callback_cpu_us_per_step",
                                                   "callback_cpu_share_of_step"}),
    "time_to_first_step.py": ("time_to_first_step", {"ours_s", "baseline_s", "ratio", "runs", "ours_all",
                                                      "baseline_all"}),
    "ddp_first_step.py": ("ddp_time_to_first_step", {"ranks", "ours_s", "baseline_s", "ratio", "runs", "ours_all",
                                                      "baseline_all"}),
    "dispatch.py": ("dispatch", {"ours_p50_ms", "ours_p99_ms", "baseline_p50_ms", "baseline_p99_ms", "ratio_p50",
                                 "jobs"}),
    "scaling.py": ("scaling", {"makespan_1_worker_s", "makespan_2_workers_s", "ideal_2_workers_s",
                               "efficiency_2_workers", "jobs"}),
    "api_followers.py": ("api_followers", {"followers", "requests", "healthz_with_followers",
                                           "healthz_baseline_no_followers", "p99_ratio", "met", "server_threads",
                                           "server_rss_mb"}),
    "replication.py": ("replication", {"none", "replicated", "ratio_dispatch_p50", "ratio_dispatch_p99",
                                       "ratio_submit_p50", "ratio_end_p50", "ratio_events_per_s", "ratio_follow_p50",
                                       "replicas", "rounds", "jobs", "events", "followed"}),
    "fleet.py": ("fleet", {"command", "small_profile_bytes_out_per_worker_growth", "training_worker_large_profile",
                           "replay_model_check", "goal", "met", "met_at_full_rate"}),
    "partition.py": ("partition", {"runs", "all_ok", "models_published", "max_step_overlap_s",
                                   "max_process_overlap_s", "stale_events_after_heal", "per_run"}),
    "nemesis.py": ("nemesis", {"runs", "faults_injected", "faults_by_kind", "violations_by_invariant", "violations",
                               "jobs", "per_run"}),
    "failover.py": ("failover", {"runs", "acknowledged", "refused", "lost", "double_trainers", "bad_models",
                                 "step_errors", "follower_errors", "refused_ran", "violations", "errors",
                                 "next_step_s_median",
                                 "worker_restarts", "per_run"}),
    "storage.py": ("storage", {"step_s_uploading", "step_s_not_uploading", "step_ratio", "publish", "cache"}),
}
# Where network hosts cannot be made (no root, no `ip netns`), these print {"skipped": reason}.
MAY_SKIP = {"partition.py", "nemesis.py"}
SLOW = {"fleet.py", "partition.py", "nemesis.py"}


def last_json(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in the output:\n{stdout[-3000:]}"
    out = json.loads(lines[-1])
    assert isinstance(out, dict)
    return out


def test_every_benchmark_has_a_smoke() -> None:
    """A new script in bench/ is smoked here too, and run_all.py runs only scripts smoked here."""
    scripts = {p.name for p in BENCH.glob("*.py")} - NOT_BENCHMARKS
    assert scripts == set(EXPECTED)
    for script in scripts:
        assert "smoke_flag(" in (BENCH / script).read_text() or '"--smoke"' in (BENCH / script).read_text(), script
    spec = importlib.util.spec_from_file_location("bench_run_all", BENCH / "run_all.py")
    assert spec is not None and spec.loader is not None
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    assert set(run_all.SCRIPTS) <= set(EXPECTED)


@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.nemesis] if s == "nemesis.py" else [])
                                    for s in EXPECTED])
def test_smoke(script: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPE_")}
    env["TMPDIR"] = str(tmp_path)
    timeout = LONG if script in SLOW else TIMEOUT
    try:
        proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], cwd=BENCH, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{script} --smoke ran past {timeout} s:\n{str(e.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"{script} --smoke exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    out = last_json(proc.stdout)
    name, keys = EXPECTED[script]
    assert out["bench"] == name
    assert out["smoke"] is True
    if script in MAY_SKIP and "skipped" in out:
        assert isinstance(out["skipped"], str) and out["skipped"]
        return
    missing = (COMMON | keys) - set(out)
    assert not missing, f"{script}: no {sorted(missing)} in {sorted(out)}"
    if script == "replication.py":  # the figures of each setting
        for setting in ("none", "replicated"):
            assert {"dispatch_p50_ms", "dispatch_p99_ms", "events_per_s", "follow_p50_ms",
                    "wait_calls"} <= set(out[setting]), out
        assert out["replicated"]["wait_calls"] > 0, out
    if script == "fleet.py":  # keys named after the sizes run
        assert any(k.startswith("idle_worker_large_profile_") for k in out), sorted(out)
        assert any(k.startswith("replay_") and k.endswith("_training_workers") for k in out), sorted(out)
