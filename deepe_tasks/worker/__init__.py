"""The Celery worker: the task, the supervisor that holds a job's lease, the job's own Redis
user, the reaper and shutdown, and the client of the warm zygote."""
