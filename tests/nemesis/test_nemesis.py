"""The nemesis, short and seeded: real jobs on two workers with hosts of their own, while
random faults strike (links cut and slowed, Redis paused and restarted, job processes,
zygotes and whole workers killed, whole worker trees paused); then every invariant of
docs/reliability.md ("The nemesis") must hold. DEEPE_NEMESIS_SEED picks another run.

On failure the table lists the faults as they were injected and each violation with the
workers' log lines about it; `report.json` and the workers' logs stay in the test's folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import SLOW_METHOD, write_method
from tests.nemesis.harness import Config, Unavailable, run

pytestmark = [pytest.mark.e2e, pytest.mark.nemesis]

SEED = int(os.environ.get("DEEPE_NEMESIS_SEED", "23"))


def test_random_faults_break_no_invariant(tmp_path: Path, storage: Path, store: Path, tiny_model: Path,
                                          colors_data: Path) -> None:
    # Given two workers on hosts of their own, a private durable Redis, and short real jobs
    method = write_method(store, "nemesis", SLOW_METHOD)
    config = Config(seed=SEED)
    # When the nemesis strikes at random while the jobs are submitted, cancelled and merged
    try:
        report = run(config, tmp_path, storage, tiny_model, colors_data, method)
    except Unavailable as e:
        pytest.skip(f"the nemesis needs network hosts of its own: {e}")
    print(report.table())
    (tmp_path / "report.json").write_text(json.dumps(report.summary(), indent=2, default=str))
    # Then the faults really were injected, and the jobs really ran
    assert sum(f.injected for f in report.faults) >= config.faults // 2, report.table()
    assert sum(j.submitted for j in report.jobs) >= config.jobs, report.table()
    # and no invariant was broken: one final state each, no idle worker while jobs waited, one
    # model per job, every event once, nothing left running
    assert not report.violations, report.table()
