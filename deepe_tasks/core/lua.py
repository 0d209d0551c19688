"""The Lua of the job state machine: one script per transition of `jobstore.py`.

Each script checks the job's state (and, for an attempt's writes, its fencing token) and then
writes everything the transition changes, or nothing. Redis runs a script atomically but does
not undo the writes of a script that fails half-way, so every script that writes more than
one key checks the types of the keys it writes before its first write.
"""

# The token check that opens every fenced transition: the job runs this very attempt.
CURRENT = """
local function current(job, attempt)
  return redis.call('hget', job, 'status') == 'running' and redis.call('hget', job, 'attempts') == attempt
end
-- An event of the platform's; pcall: a stream that a method broke (it may write its own
-- stream) must not stop the job's state from changing.
local function event(stream, data, attempt)
  redis.pcall('xadd', stream, '*', 'data', data, 'a', attempt, 's', 0)
end
-- All or nothing: before a step writes, every key it writes must hold its own type (or none),
-- since Redis does not undo the writes of a script that fails half-way. Pairs: key, type.
local function mistyped(pairs)
  for i = 1, #pairs, 2 do
    local t = redis.call('type', pairs[i])['ok']
    if t ~= 'none' and t ~= pairs[i + 1] then return pairs[i] .. ' is a ' .. t end
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
local bad = mistyped({KEYS[2], 'zset', KEYS[3], 'string', KEYS[4], 'stream', KEYS[5], 'zset'})
if bad then return redis.error_reply('the job was not created: ' .. bad) end
redis.call('set', KEYS[3], ARGV[1])
redis.call('hset', KEYS[1], unpack(ARGV, 5))
redis.call('zadd', KEYS[2], ARGV[2], ARGV[3])
redis.call('zadd', KEYS[5], ARGV[2], ARGV[3])
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
APPEND = CURRENT + """
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
    redis.call('xadd', KEYS[1], '*', 'data', ARGV[i + 1], 'a', ARGV[2], 's', ARGV[i])
    n = n + 1
  end
end
return n
"""

# May the current attempt publish its model now? Only while its lease has at least ARGV[2] ms
# left, so no other attempt can be claimed before the rename that follows is done.
# ARGV: job key, lease key, attempt, min_ttl_ms. 1 yes, 0 fenced off, -1 lease too short.
CHECK = CURRENT + """
if not current(ARGV[1], ARGV[3]) then return 0 end
local value = redis.call('get', ARGV[2])
if not value or string.sub(value, 1, #ARGV[3] + 1) ~= ARGV[3] .. ':' then return -1 end
if redis.call('pttl', ARGV[2]) < tonumber(ARGV[4]) then return -1 end
return 1
"""

# The current attempt ends the job; the same finish sent again after a lost reply succeeds
# again, writing nothing. KEYS: job, running, lease, events. ARGV: attempt, id, final event,
# status, other fields…
FINISH = CURRENT + """
local step = 'finish:' .. ARGV[1] .. ':' .. ARGV[4]
if redis.call('hget', KEYS[1], 'last_step') == step then return 1 end
if not current(KEYS[1], ARGV[1]) then return 0 end
local bad = mistyped({KEYS[1], 'hash', KEYS[2], 'set', KEYS[4], 'stream'})
if bad then return redis.error_reply('the job was not finished: ' .. bad) end
redis.call('hset', KEYS[1], 'last_step', step, 'status', ARGV[4], unpack(ARGV, 5))
redis.call('srem', KEYS[2], ARGV[2])
redis.call('del', KEYS[3])
event(KEYS[4], ARGV[3], ARGV[1])
return 1
"""

# A running attempt is over without an end of its own: its worker shut down or lost Redis
# (the attempt itself asks, with ARGV[3] = '0'), or its lease expired (the reaper asks, with
# ARGV[3] = '1', and a live lease wins). A plain cancel that waits makes it cancelled; past
# DEEPE_MAX_RESUMES it fails; else it is queued again.
# A requeued job goes into the unsent set until its message is sent. The same requeue sent
# again after a lost reply gets the same answer, writing nothing.
# KEYS: job, running, lease, events, cancel, unsent. ARGV: attempt, id, lease must be gone,
# max resumes, now, cancelled error, cancelled event, failed error, failed event, requeued event.
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
local outcome, fields, data = 'queued', {'status', 'queued'}, ARGV[10]
if redis.call('get', KEYS[5]) == 'cancel' then
  outcome, fields, data = 'cancelled', {'status', 'cancelled', 'error', ARGV[6], 'finished_at', ARGV[5]}, ARGV[7]
elseif tonumber(ARGV[1]) > tonumber(ARGV[4]) then
  outcome, fields, data = 'failed', {'status', 'failed', 'error', ARGV[8], 'finished_at', ARGV[5]}, ARGV[9]
else
  redis.call('zadd', KEYS[6], ARGV[5], ARGV[2])
end
redis.call('hset', KEYS[1], 'last_step', mine .. outcome, unpack(fields))
event(KEYS[4], data, ARGV[1])
return outcome
"""

# A cancel: always leaves the flag (the running attempt reads it); a queued job is cancelled
# at once. KEYS: job, cancel, events, unsent. ARGV: flag, flag ttl, now, error, event.
CANCEL = CURRENT + """
local status = redis.call('hget', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'queued' and status ~= 'running' then return 'ended:' .. status end
local bad = mistyped({KEYS[2], 'string', KEYS[4], 'zset'})
if bad then return redis.error_reply('the job was not cancelled: ' .. bad) end
redis.call('set', KEYS[2], ARGV[1], 'EX', ARGV[2])
if status == 'queued' then
  redis.call('zrem', KEYS[4], redis.call('hget', KEYS[1], 'id'))
  redis.call('hset', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[3], 'error', ARGV[4])
  event(KEYS[3], ARGV[5], redis.call('hget', KEYS[1], 'attempts') or 0)
  return 'cancelled'
end
return 'running'
"""

# A queued job whose message could not be sent fails. KEYS: job, events, unsent. ARGV: now,
# error, event.
FAIL_QUEUED = CURRENT + """
if redis.call('hget', KEYS[1], 'status') ~= 'queued' then return 0 end
if mistyped({KEYS[3], 'zset'}) then return redis.error_reply('the job was not failed: the unsent set is mistyped') end
redis.call('zrem', KEYS[3], redis.call('hget', KEYS[1], 'id'))
redis.call('hset', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error', ARGV[2])
event(KEYS[2], ARGV[3], redis.call('hget', KEYS[1], 'attempts') or 0)
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
