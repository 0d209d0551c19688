"""The Lua of the job state machine: one script per transition of `jobstore.py`.

Each script checks the job's state (and, for an attempt's writes, its fencing token) and then
writes everything the transition changes, or nothing. Redis runs a script atomically but does
not undo the writes of a script that fails half-way, so every script that writes more than
one key checks the types of the keys it writes before its first write.

Besides the record, each transition keeps what reads must not compute from the whole history:
the per-state and per-method indexes (sorted sets by submit time), the counters of
`deepe:stats` (for /metrics), and, when a job ends, the expiry of all Redis keeps of it
(DEEPE_JOB_RETENTION), with the `deepe:expiring` entry by which the indexes drop it.
"""

from deepe_tasks.core import keys

# A running job's stream keeps about this many entries, an ended one's about the second
# (XADD/XTRIM MAXLEN ~): every event is also in the job folder's events.jsonl.
STREAM_MAXLEN = 5000
ENDED_STREAM_MAXLEN = 1000
# Upper bounds (seconds) of deepe_job_duration_seconds' buckets, counted in deepe:stats.
DURATION_BUCKETS = (60, 300, 900, 3600, 4 * 3600, 12 * 3600, 48 * 3600)

_NAMES = f"""
local INDEX, RUNNING, UNSENT, EXPIRING, STATS = '{keys.JOBS_INDEX}', '{keys.RUNNING}', '{keys.UNSENT}', '{keys.EXPIRING}', '{keys.STATS}'
local QUEUES, METHOD_USERS, IDS = '{keys.QUEUES}', '{keys.METHOD_USERS}', '{keys.IDS}'
local BY_STATUS, BY_METHOD = '{keys.by_status("")}', '{keys.by_method("")}'
local JOB, SOURCE, CANCEL_FLAG = '{keys.job("")}', '{keys.method_source("")}', '{keys.cancel("")}'
local ENDED_MAXLEN = {ENDED_STREAM_MAXLEN}
local BUCKETS = {{{", ".join(str(b) for b in DURATION_BUCKETS)}}}
local FINAL = {{'succeeded', 'failed', 'cancelled'}}
"""

# The token check that opens every fenced transition: the job runs this very attempt. The job
# process's scripts (APPEND, CHECK) run every second on every training worker of a fleet: they
# get this alone, not the helpers of the transitions below.
FENCE = f"""
local MAXLEN = {STREAM_MAXLEN}
local function current(job, attempt)
  return redis.call('hget', job, 'status') == 'running' and redis.call('hget', job, 'attempts') == attempt
end
"""
CURRENT = _NAMES + FENCE + """
-- An event of the platform's; pcall: a stream that a method broke (it may write its own
-- stream) must not stop the job's state from changing.
local function event(stream, data, attempt)
  redis.pcall('xadd', stream, 'MAXLEN', '~', MAXLEN, '*', 'data', data, 'a', attempt, 's', 0)
end
-- The job moves from one state's index to another's (from: false for a new job).
local function move(job, id, from, to)
  if from then redis.call('zrem', BY_STATUS .. from, id) end
  redis.call('zadd', BY_STATUS .. to, redis.call('hget', job, 'submitted_at') or 0, id)
end
local function now_s()
  local t = redis.call('time')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
-- Drop from the indexes up to n jobs whose keys have expired; a job id used again since is
-- left where it is.
local function prune(n)
  local gone = redis.call('zrangebyscore', EXPIRING, '-inf', now_s(), 'LIMIT', 0, n)
  for _, member in ipairs(gone) do
    local id, method = string.match(member, '^(%S+) (%S*)$')
    if id and redis.call('exists', JOB .. id) == 0 then
      redis.call('zrem', INDEX, id)
      redis.call('zrem', IDS, id)
      redis.call('zrem', BY_METHOD .. method, id)
      for _, s in ipairs(FINAL) do redis.call('zrem', BY_STATUS .. s, id) end
    end
    redis.call('zrem', EXPIRING, member)
  end
  return #gone
end
-- The job has ended (status: its final state): count it, trim its stream, and let all that
-- Redis keeps of it expire `retention` seconds from now. Its pinned source expires then too,
-- unless a job that has not ended runs it.
local function ended(job, id, stream, status, now, retention)
  redis.call('hincrby', STATS, 'finished:' .. status, 1)
  local started = tonumber(redis.call('hget', job, 'started_at') or '')
  if started then
    local d = math.max(0, tonumber(now) - started)
    redis.call('hincrbyfloat', STATS, 'duration:sum', d)
    redis.call('hincrby', STATS, 'duration:count', 1)
    for _, b in ipairs(BUCKETS) do
      if d <= b then redis.call('hincrby', STATS, 'duration:le:' .. b, 1) end
    end
  end
  local info = redis.pcall('xinfo', 'stream', stream)
  if type(info) == 'table' and not info.err then
    for i = 1, #info, 2 do
      if info[i] == 'entries-added' then redis.call('hincrby', STATS, 'events', info[i + 1]) end
    end
    redis.pcall('xtrim', stream, 'MAXLEN', '~', ENDED_MAXLEN)
    redis.call('expire', stream, retention)
  end
  redis.call('expire', job, retention)
  redis.call('del', CANCEL_FLAG .. id)
  local sha = redis.call('hget', job, 'method_sha256')
  if sha and redis.call('hincrby', METHOD_USERS, sha, -1) <= 0 then
    redis.call('hdel', METHOD_USERS, sha)
    redis.call('expire', SOURCE .. sha, retention)
  end
  redis.call('zadd', EXPIRING, now_s() + tonumber(retention), id .. ' ' .. (redis.call('hget', job, 'method') or ''))
  prune(10)
end
-- The keys every transition may write besides its own, with their types.
local SHARED = {STATS, 'hash', EXPIRING, 'zset', METHOD_USERS, 'hash', QUEUES, 'set', INDEX, 'zset', IDS, 'zset',
                BY_STATUS .. 'queued', 'zset', BY_STATUS .. 'running', 'zset', BY_STATUS .. 'succeeded', 'zset',
                BY_STATUS .. 'failed', 'zset', BY_STATUS .. 'cancelled', 'zset'}
-- All or nothing: before a step writes, every key it writes must hold its own type (or none),
-- since Redis does not undo the writes of a script that fails half-way. Pairs: key, type.
local function mistyped(pairs)
  for _, list in ipairs({pairs, SHARED}) do
    for i = 1, #list, 2 do
      local t = redis.call('type', list[i])['ok']
      if t ~= 'none' and t ~= list[i + 1] then return list[i] .. ' is a ' .. t end
    end
  end
  return false
end
"""

# The job is also put in the unsent set until its message is sent (`sent`): a client that dies
# in between leaves it to the reaper, which sends it. A create sent again after a lost reply
# finds its own record (same submit time) and succeeds.
# KEYS: job, index, source, events, unsent. ARGV: source, submitted_at, id, first event, fields…
CREATE = CURRENT + """
if redis.call('exists', KEYS[1]) == 1 then
  return redis.call('hget', KEYS[1], 'submitted_at') == ARGV[2] and 1 or 0
end
local fields = {}
for i = 5, #ARGV, 2 do fields[ARGV[i]] = ARGV[i + 1] end
local bad = mistyped({KEYS[2], 'zset', KEYS[3], 'string', KEYS[4], 'stream', KEYS[5], 'zset',
                      BY_METHOD .. fields['method'], 'zset'})
if bad then return redis.error_reply('the job was not created: ' .. bad) end
prune(10)
redis.call('set', KEYS[3], ARGV[1])  -- also ends an expiry that an ended job of this source set
redis.call('hincrby', METHOD_USERS, fields['method_sha256'], 1)
redis.call('hset', KEYS[1], unpack(ARGV, 5))
redis.call('zadd', KEYS[2], ARGV[2], ARGV[3])
redis.call('zadd', KEYS[5], ARGV[2], ARGV[3])
redis.call('zadd', BY_METHOD .. fields['method'], ARGV[2], ARGV[3])
redis.call('zadd', IDS, 0, ARGV[3])
move(KEYS[1], ARGV[3], false, 'queued')
redis.call('sadd', QUEUES, fields['route'] or fields['queue'])
redis.call('hincrby', STATS, 'submitted', 1)
event(KEYS[4], ARGV[4], 0)
return 1
"""

# A worker takes a queued job, or a running one whose lease expired (a redelivery), in one
# step: the attempt count goes up (the new fencing token), the lease is "ATTEMPT:HOLDER", the
# job is running on this worker, in the running set, with its `started` event; the reply
# carries the record and the method's pinned source.
# The same claim sent again after a lost reply (the lease is this holder's) gets the same answer.
# KEYS: job, lease, running, events, unsent. ARGV: holder, ttl_ms, id, worker, started_at, pid,
# source key prefix, started event (with "@ATTEMPT@" for the attempt).
CLAIM = CURRENT + """
local status = redis.call('hget', KEYS[1], 'status')
if not status then return {'missing', ''} end
if status ~= 'queued' and status ~= 'running' then return {'ended', status} end
local bad = mistyped({KEYS[1], 'hash', KEYS[2], 'string', KEYS[3], 'set', KEYS[4], 'stream', KEYS[5], 'zset'})
if bad then return {'corrupt', bad} end
local sha = redis.call('hget', KEYS[1], 'method_sha256') or ''
local holder = redis.call('get', KEYS[2])
if holder then
  if status == 'running' and holder == redis.call('hget', KEYS[1], 'attempts') .. ':' .. ARGV[1] then
    return {'ok', redis.call('hgetall', KEYS[1]), redis.call('get', ARGV[7] .. sha)}
  end
  return {'leased', holder}
end
local attempt = redis.call('hincrby', KEYS[1], 'attempts', 1)
redis.call('set', KEYS[2], attempt .. ':' .. ARGV[1], 'PX', ARGV[2])
move(KEYS[1], ARGV[3], status, 'running')
redis.call('hset', KEYS[1], 'status', 'running', 'worker', ARGV[4], 'started_at', ARGV[5], 'pid', ARGV[6])
redis.call('hdel', KEYS[1], 'last_step')  -- the job moved on: an older step is not answered again
redis.call('sadd', KEYS[3], ARGV[3])
redis.call('zrem', KEYS[5], ARGV[3])
event(KEYS[4], (string.gsub(ARGV[8], '"@ATTEMPT@"', tostring(attempt))), attempt)
return {'ok', redis.call('hgetall', KEYS[1]), redis.call('get', ARGV[7] .. sha)}
"""

# Keep the lease of the current attempt; take it back if it expired and nobody replaced us.
# KEYS: job, lease. ARGV: attempt, lease value, ttl_ms. 1 renewed, 2 retaken, 0 fenced off.
RENEW = CURRENT + """
if not current(KEYS[1], ARGV[1]) then return 0 end
local value = redis.call('get', KEYS[2])
if value == ARGV[2] then redis.call('pexpire', KEYS[2], ARGV[3]) return 1 end
if not value then redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3]) return 2 end
return 0
"""

# Events of the current attempt, each once. KEYS: events. ARGV: job key, attempt, then seq
# and event pairs, seqs rising. Returns how many were appended, -1 if the attempt is fenced
# off. (The job process runs this and the next script with a user that may only read the job's
# record and lease; Redis checks keys declared in KEYS for write access, so those two come in
# ARGV, and each command in the script is checked on its own.)
APPEND = FENCE + """
if not current(ARGV[1], ARGV[2]) then return -1 end
local last = 0
local top = redis.call('xrevrange', KEYS[1], '+', '-', 'COUNT', 1)
if top[1] then
  local f, a, s = top[1][2], nil, nil
  for i = 1, #f, 2 do
    if f[i] == 'a' then a = f[i + 1] elseif f[i] == 's' then s = f[i + 1] end
  end
  if a == ARGV[2] and s then last = tonumber(s) end
end
local n = 0
for i = 3, #ARGV, 2 do
  if tonumber(ARGV[i]) > last then
    redis.call('xadd', KEYS[1], 'MAXLEN', '~', MAXLEN, '*', 'data', ARGV[i + 1], 'a', ARGV[2], 's', ARGV[i])
    n = n + 1
  end
end
return n
"""

# May the current attempt publish its model now? Only while its lease has at least ARGV[2] ms
# left, so no other attempt can be claimed before the rename that follows is done.
# ARGV: job key, lease key, attempt, min_ttl_ms. 1 yes, 0 fenced off, -1 lease too short.
CHECK = FENCE + """
if not current(ARGV[1], ARGV[3]) then return 0 end
local value = redis.call('get', ARGV[2])
if not value or string.sub(value, 1, #ARGV[3] + 1) ~= ARGV[3] .. ':' then return -1 end
if redis.call('pttl', ARGV[2]) < tonumber(ARGV[4]) then return -1 end
return 1
"""

# The current attempt ends the job; the same finish sent again after a lost reply succeeds
# again, writing nothing. KEYS: job, running, lease, events. ARGV: attempt, id, final event,
# status, retention, finished_at, other fields…
FINISH = CURRENT + """
local step = 'finish:' .. ARGV[1] .. ':' .. ARGV[4]
if redis.call('hget', KEYS[1], 'last_step') == step then return 1 end
if not current(KEYS[1], ARGV[1]) then return 0 end
local bad = mistyped({KEYS[1], 'hash', KEYS[2], 'set', KEYS[4], 'stream'})
if bad then return redis.error_reply('the job was not finished: ' .. bad) end
redis.call('hset', KEYS[1], 'last_step', step, 'status', ARGV[4], 'finished_at', ARGV[6], unpack(ARGV, 7))
redis.call('srem', KEYS[2], ARGV[2])
redis.call('del', KEYS[3])
move(KEYS[1], ARGV[2], 'running', ARGV[4])
event(KEYS[4], ARGV[3], ARGV[1])
ended(KEYS[1], ARGV[2], KEYS[4], ARGV[4], ARGV[6], ARGV[5])
return 1
"""

# A running attempt is over without an end of its own: its worker shut down or lost Redis
# (the attempt itself asks, with ARGV[3] = '0'), or its lease expired (the reaper asks, with
# ARGV[3] = '1', and a live lease wins). A plain cancel that waits makes it cancelled; a loss
# (ARGV[11] = '1': anything but a preemption announced by SIGTERM) counts toward
# DEEPE_MAX_RESUMES, past which it fails; else it is queued again.
# A requeued job goes into the unsent set until its message is sent. The same requeue sent
# again after a lost reply gets the same answer, writing nothing.
# KEYS: job, running, lease, events, cancel, unsent. ARGV: attempt, id, lease must be gone,
# max resumes, now, cancelled error, cancelled event, failed error, failed event, requeued event,
# a loss ('1' or '0'), retention.
REQUEUE = CURRENT + """
local last = redis.call('hget', KEYS[1], 'last_step') or ''
local mine = 'requeue:' .. ARGV[1] .. ':'
if string.sub(last, 1, #mine) == mine then return string.sub(last, #mine + 1) end
if not current(KEYS[1], ARGV[1]) then return 'stale' end
if ARGV[3] == '1' and redis.call('exists', KEYS[3]) == 1 then return 'leased' end
local bad = mistyped({KEYS[1], 'hash', KEYS[2], 'set', KEYS[3], 'string', KEYS[4], 'stream', KEYS[5], 'string',
                     KEYS[6], 'zset'})
if bad then return redis.error_reply('the job was not requeued: ' .. bad) end
redis.call('del', KEYS[3])
redis.call('srem', KEYS[2], ARGV[2])
local losses = tonumber(redis.call('hget', KEYS[1], 'losses') or '0') + tonumber(ARGV[11])
local outcome, fields, data = 'queued', {'status', 'queued'}, ARGV[10]
if redis.call('get', KEYS[5]) == 'cancel' then
  outcome, fields, data = 'cancelled', {'status', 'cancelled', 'error', ARGV[6], 'finished_at', ARGV[5]}, ARGV[7]
elseif losses > tonumber(ARGV[4]) then
  outcome, fields, data = 'failed', {'status', 'failed', 'error', ARGV[8], 'finished_at', ARGV[5]}, ARGV[9]
else
  redis.call('zadd', KEYS[6], ARGV[5], ARGV[2])
end
redis.call('hset', KEYS[1], 'last_step', mine .. outcome, 'losses', losses, unpack(fields))
move(KEYS[1], ARGV[2], 'running', outcome)
event(KEYS[4], data, ARGV[1])
if outcome ~= 'queued' then ended(KEYS[1], ARGV[2], KEYS[4], outcome, ARGV[5], ARGV[12]) end
return outcome
"""

# A cancel: always leaves the flag (the running attempt reads it); a queued job is cancelled
# at once. KEYS: job, cancel, events, unsent. ARGV: flag, flag ttl, now, error, event, retention.
CANCEL = CURRENT + """
local status = redis.call('hget', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'queued' and status ~= 'running' then return 'ended:' .. status end
local bad = mistyped({KEYS[2], 'string', KEYS[4], 'zset'})
if bad then return redis.error_reply('the job was not cancelled: ' .. bad) end
redis.call('set', KEYS[2], ARGV[1], 'EX', ARGV[2])
if status == 'queued' then
  local id = redis.call('hget', KEYS[1], 'id')
  redis.call('zrem', KEYS[4], id)
  redis.call('hset', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[3], 'error', ARGV[4])
  move(KEYS[1], id, 'queued', 'cancelled')
  event(KEYS[3], ARGV[5], redis.call('hget', KEYS[1], 'attempts') or 0)
  ended(KEYS[1], id, KEYS[3], 'cancelled', ARGV[3], ARGV[6])
  return 'cancelled'
end
return 'running'
"""

# A queued job whose message could not be sent fails. KEYS: job, events, unsent. ARGV: now,
# error, event, retention.
FAIL_QUEUED = CURRENT + """
if redis.call('hget', KEYS[1], 'status') ~= 'queued' then return 0 end
local bad = mistyped({KEYS[3], 'zset'})
if bad then return redis.error_reply('the job was not failed: ' .. bad) end
local id = redis.call('hget', KEYS[1], 'id')
redis.call('zrem', KEYS[3], id)
redis.call('hset', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error', ARGV[2])
move(KEYS[1], id, 'queued', 'failed')
event(KEYS[2], ARGV[3], redis.call('hget', KEYS[1], 'attempts') or 0)
ended(KEYS[1], id, KEYS[2], 'failed', ARGV[1], ARGV[4])
return 1
"""

# The running set holds running jobs only. KEYS: job, running. ARGV: id.
FORGET_RUNNING = """
if redis.call('hget', KEYS[1], 'status') == 'running' then return 0 end
return redis.call('srem', KEYS[2], ARGV[1])
"""

# The current attempt's process changed (its spare died before the hand-over). KEYS: job.
SET_PID = CURRENT + """
if not current(KEYS[1], ARGV[1]) then return 0 end
redis.call('hset', KEYS[1], 'pid', ARGV[2])
return 1
"""

# Drop from the indexes up to ARGV[1] jobs whose keys have expired (each transition that ends
# a job drops a few too); returns how many entries were looked at.
PRUNE = CURRENT + """
return prune(tonumber(ARGV[1]))
"""

# One page of job ids, newest first, from the index KEYS[1] starting at rank ARGV[1]: those
# also in KEYS[2] (when given), at most ARGV[2] of them, looking at no more than ARGV[3]
# entries. Returns the next rank (-1: the end), then the ids.
PAGE = """
local rank, limit, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
while #out < limit and budget > 0 do
  local ids = redis.call('zrevrange', KEYS[1], rank, rank + math.min(budget, 500) - 1)
  if #ids == 0 then return {-1, unpack(out)} end
  for _, id in ipairs(ids) do
    rank, budget = rank + 1, budget - 1
    if not KEYS[2] or redis.call('zscore', KEYS[2], id) then
      out[#out + 1] = id
      if #out == limit then break end
    end
  end
end
if rank >= redis.call('zcard', KEYS[1]) then rank = -1 end
return {rank, unpack(out)}
"""
