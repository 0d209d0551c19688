"""What a worker and its job processes agree on, without importing each other."""

from __future__ import annotations

import signal

RESULT_FILE = "result.json"  # in the job folder: how the attempt ended (a RunResult)
LOG_FILE = "output.log"  # in the job folder: the job process's stdout and stderr
# The worker sends this to a job process that should checkpoint and stop, to be resumed.
PREEMPT_SIGNAL = signal.SIGUSR1
