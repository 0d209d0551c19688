-- queued (or running, lease expired: a redelivery) -> running, in one step: the attempt count
-- goes up (the new fencing token), the lease is "ATTEMPT:HOLDER", the job is running on this
-- worker, in the running set, with its `started` event; the reply carries the record and the
-- method's pinned source (its key is named by the record's method_sha256, so it is not in KEYS).
-- The same claim sent again after a lost reply (the lease is this holder's) gets the same answer.
-- KEYS: job, lease, running, events, unsent. ARGV: holder, ttl_ms, id, worker, started_at, pid,
-- started event (with the attempt placeholder for the attempt).
local status = redis.call('hget', KEYS[1], 'status')
if not status then return {'missing', ''} end
if status ~= 'queued' and status ~= 'running' then return {'ended', status} end
local bad = mistyped({KEYS[1], 'hash', KEYS[2], 'string', KEYS[3], 'set', KEYS[4], 'stream', KEYS[5], 'zset'})
if bad then return {'corrupt', bad} end
local source = SOURCE .. (redis.call('hget', KEYS[1], 'method_sha256') or '')
local holder = redis.call('get', KEYS[2])
if holder then
  if status == 'running' and holder == redis.call('hget', KEYS[1], 'attempts') .. ':' .. ARGV[1] then
    return {'ok', redis.call('hgetall', KEYS[1]), redis.call('get', source)}
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
event(KEYS[4], (string.gsub(ARGV[7], '"${ATTEMPT_PLACEHOLDER}"', tostring(attempt))), attempt)
return {'ok', redis.call('hgetall', KEYS[1]), redis.call('get', source)}
