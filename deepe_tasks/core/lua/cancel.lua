-- A cancel: always leaves the flag (the running attempt reads it); a queued job is cancelled
-- at once (queued -> cancelled). KEYS: job, cancel flag, events, unsent.
-- ARGV: flag, flag ttl, now, error, event, retention.
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
  ended(KEYS[1], id, KEYS[3], KEYS[2], 'cancelled', ARGV[3], ARGV[6])
  return 'cancelled'
end
return 'running'
