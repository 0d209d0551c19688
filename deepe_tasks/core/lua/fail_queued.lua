-- queued -> failed: the job's message could not be sent.
-- KEYS: job, events, unsent, cancel flag. ARGV: now, error, event, retention.
if redis.call('hget', KEYS[1], 'status') ~= 'queued' then return 0 end
local bad = mistyped({KEYS[3], 'zset'})
if bad then return redis.error_reply('the job was not failed: ' .. bad) end
local id = redis.call('hget', KEYS[1], 'id')
redis.call('zrem', KEYS[3], id)
redis.call('hset', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error', ARGV[2])
move(KEYS[1], id, 'queued', 'failed')
event(KEYS[2], ARGV[3], redis.call('hget', KEYS[1], 'attempts') or 0)
ended(KEYS[1], id, KEYS[2], KEYS[4], 'failed', ARGV[1], ARGV[4])
return 1
