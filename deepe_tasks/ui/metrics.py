"""Prometheus metrics of the whole system, read from what each transition keeps up to date.

A scrape costs a few round trips whatever the history's size: the per-state indexes' sizes,
the counters of `deepe:stats` (kept by the transitions' Lua, `core/lua/`) and the length of
each queue's lists. It never reads a job record.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from deepe_tasks.core import jobstore, keys
from deepe_tasks.core.broker import priority_lists
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.lua import DURATION_BUCKETS
from deepe_tasks.core.records import FINAL_STATES, JobStatus


class DeepeCollector(Collector):
    def collect(self) -> Iterator[Any]:
        client = get_redis()
        jobstore.prune(client)  # the ended jobs' counts are of the jobs still kept
        pipe = client.pipeline(transaction=False)
        for state in JobStatus:
            pipe.zcard(keys.by_status(state.value))
        pipe.scard(keys.RUNNING)
        pipe.hgetall(keys.STATS)
        pipe.smembers(keys.QUEUES)
        *sizes, running, stats, queues = pipe.execute()
        stats = {k: float(v) for k, v in stats.items()}

        by_state = GaugeMetricFamily("deepe_jobs", "Jobs kept in Redis, by state (ended ones until they expire).",
                                     labels=["state"])
        for state, size in zip(JobStatus, sizes, strict=True):
            by_state.add_metric([state.value], size)
        yield by_state
        yield GaugeMetricFamily("deepe_running_jobs", "Jobs that a worker is running.", value=running)

        pipe = client.pipeline(transaction=False)
        names = sorted(queues)
        for queue in names:
            for _, name in priority_lists(queue):
                pipe.llen(name)
        lengths = pipe.execute()
        per_queue = len(priority_lists(""))
        waiting = GaugeMetricFamily("deepe_queue_length", "Jobs waiting in each queue.", labels=["queue"])
        for i, queue in enumerate(names):
            waiting.add_metric([queue], sum(lengths[i * per_queue:(i + 1) * per_queue]))
        yield waiting

        yield CounterMetricFamily("deepe_jobs_submitted", "Jobs submitted.", value=stats.get("submitted", 0))
        finished = CounterMetricFamily("deepe_jobs_finished", "Jobs that ended, by final state.", labels=["state"])
        for state in sorted(FINAL_STATES, key=lambda s: s.value):
            finished.add_metric([state.value], stats.get(f"finished:{state.value}", 0))
        yield finished
        yield CounterMetricFamily("deepe_events_published", "Events in the streams of the jobs that ended.",
                                  value=stats.get("events", 0))
        hooks = CounterMetricFamily("deepe_webhook_deliveries", "Webhook deliveries, by outcome.", labels=["outcome"])
        for outcome in ("delivered", "failed"):
            hooks.add_metric([outcome], stats.get(f"webhooks:{outcome}", 0))
        yield hooks
        yield GaugeMetricFamily("deepe_webhook_pending", "Webhook deliveries not sent yet.",
                                value=client.xlen(keys.WEBHOOK_OUTBOX))

        count = stats.get("duration:count", 0)
        buckets = [(str(float(b)), stats.get(f"duration:le:{b}", 0)) for b in DURATION_BUCKETS] + [("+Inf", count)]
        histogram = HistogramMetricFamily("deepe_job_duration_seconds", "Run time of ended jobs (last attempt).")
        histogram.add_metric([], buckets, sum_value=stats.get("duration:sum", 0))
        yield histogram
