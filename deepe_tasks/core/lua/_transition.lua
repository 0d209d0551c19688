-- Prelude of the transitions (after _names and _fence): their helpers.
-- An event of the platform's; pcall: a stream that a method broke (it may write its own
-- stream) must not stop the job's state from changing.
local function event(stream, data, attempt)
  redis.pcall('xadd', stream, 'MAXLEN', '~', MAXLEN, '*', 'data', data, 'a', attempt, 's', 0)
end
-- The job moves from one state's index to another's (from: false for a new job). Where
-- webhooks are on, its delivery goes into the outbox in this same step (core/webhooks.py).
local function move(job, id, from, to)
  if from then redis.call('zrem', BY_STATUS .. from, id) end
  redis.call('zadd', BY_STATUS .. to, redis.call('hget', job, 'submitted_at') or 0, id)
  if redis.call('exists', WEBHOOKS_ON) == 1 or redis.call('hexists', job, 'webhook') == 1 then
    local kind = to
    if to == 'running' then kind = 'started' elseif to == 'queued' and from then kind = 'requeued' end
    redis.call('xadd', OUTBOX, '*', 'job', id, 'type', 'job.' .. kind)
  end
end
local function now_s()
  local t = redis.call('time')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
-- Drop from the indexes up to n jobs whose keys have expired; a job id used again since is
-- left where it is. The keys of those jobs are named by the entries of EXPIRING.
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
-- The job has ended (status: its final state): count it, trim its stream, drop its cancel
-- flag, and let all that Redis keeps of it expire `retention` seconds from now. Its pinned
-- source (named by the record's method_sha256) expires then too, unless a job that has not
-- ended runs it.
local function ended(job, id, stream, flag, status, now, retention)
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
  redis.call('del', flag)
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
                OUTBOX, 'stream',
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
