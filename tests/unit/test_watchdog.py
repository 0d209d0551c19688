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


def test_an_idle_consumer_counts_as_stalled_only_after_messages_waited_the_whole_bound() -> None:
    stall = watchdog.ConsumerStall(after=30)
    # Messages wait while the worker is idle and takes none: stalled once 30 s have passed
    assert [stall.observe(t, idle=True, taken=5, waiting=2) for t in (0, 10, 20)] == [None] * 3
    assert stall.observe(30, idle=True, taken=5, waiting=2) == 30
    # Any look where it held a job, took one, or the messages went down starts the count again
    for reset in ({"idle": False, "taken": 5, "waiting": 2}, {"idle": True, "taken": 6, "waiting": 2},
                  {"idle": True, "taken": 6, "waiting": 1}, {"idle": True, "taken": 6, "waiting": 0}):
        stall = watchdog.ConsumerStall(after=30)
        stall.observe(0, idle=True, taken=5, waiting=2)
        assert stall.observe(20, **reset) is None  # type: ignore[arg-type]
        # (the count starts at the next look that sees messages wait: a full 30 s again)
        taken = int(reset["taken"])
        assert [stall.observe(t, idle=True, taken=taken, waiting=3) for t in (21, 50)] == [None, None]
        assert stall.observe(51, idle=True, taken=taken, waiting=3) == 30
    # And a look at Redis that failed (waiting unknown) judges nothing
    stall = watchdog.ConsumerStall(after=30)
    assert stall.observe(0, idle=True, taken=0, waiting=3) is None
    assert stall.observe(40, idle=True, taken=0, waiting=None) is None
    assert stall.observe(60, idle=True, taken=0, waiting=3) is None
