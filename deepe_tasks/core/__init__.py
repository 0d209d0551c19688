"""What every side shares: settings, the Redis connection, keys, records and events, input
validation, the output layout, and the job store (the only writer of a job's state in Redis)."""
