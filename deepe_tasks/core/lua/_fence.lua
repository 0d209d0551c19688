-- Prelude: the token check that opens every fenced transition: the job runs this very attempt.
-- The job process's scripts (append, check) run every second on every training worker of a
-- fleet: they get this prelude alone, not the helpers of the transitions.
local MAXLEN = ${STREAM_MAXLEN}
local function current(job, attempt)
  return redis.call('hget', job, 'status') == 'running' and redis.call('hget', job, 'attempts') == attempt
end
