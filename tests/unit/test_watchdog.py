"""The worker's watchdog judges a pool process only on fresh beats (the end-to-end test of a
stuck worker is tests/test_blips.py)."""

from __future__ import annotations

from deepe_tasks.worker import watchdog


def test_a_late_round_gives_the_pool_process_time_to_beat_again() -> None:
    rounds = watchdog.Rounds(now=0.0)
    assert rounds.may_judge(1.0) and rounds.may_judge(2.0)
    # The whole worker tree was stopped for a minute (SIGSTOP, then SIGCONT): every beat is old
    assert not rounds.may_judge(62.0)
    # then its rounds come every second again, and judge once the grace has passed
    later = [62.0 + s for s in range(1, int(watchdog.GRACE) + 1)]
    assert [rounds.may_judge(t) for t in later] == [False] * (len(later) - 1) + [True]


def test_a_stale_beat_or_a_claimed_job_without_progress_is_stuck() -> None:
    watchdog._alive.value = 100.0
    watchdog._busy_since.value = 0.0
    assert watchdog.stuck_reason(100.0 + watchdog.ALIVE_STALE - 1, stuck_after=60) is None
    assert "has not answered" in (watchdog.stuck_reason(100.0 + watchdog.ALIVE_STALE + 1, stuck_after=60) or "")
    watchdog._alive.value = 200.0
    watchdog.busy("job-1")
    watchdog._progress.value = 150.0
    assert "no progress on job job-1" in (watchdog.stuck_reason(211.0, stuck_after=60) or "")
    watchdog.beat()
    watchdog.idle()
    assert watchdog.stuck_reason(watchdog._alive.value + 1, stuck_after=60) is None
