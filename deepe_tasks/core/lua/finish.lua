-- running -> succeeded, failed or cancelled, by the current attempt; the same finish sent
-- again after a lost reply succeeds again, writing nothing.
-- KEYS: job, running, lease, events, cancel flag. ARGV: attempt, id, final event, status,
-- retention, finished_at, other fields...
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
ended(KEYS[1], ARGV[2], KEYS[4], KEYS[5], ARGV[4], ARGV[6], ARGV[5])
return 1
