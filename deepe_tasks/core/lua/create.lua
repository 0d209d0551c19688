-- queued: a new job. The job is also put in the unsent set until its message is sent (`sent`):
-- a client that dies in between leaves it to the reaper, which sends it. A create sent again
-- after a lost reply finds its own record (same submit time) and succeeds.
-- KEYS: job, index, source, events, unsent, the method's index.
-- ARGV: source, submitted_at, id, first event, fields...
if redis.call('exists', KEYS[1]) == 1 then
  return redis.call('hget', KEYS[1], 'submitted_at') == ARGV[2] and 1 or 0
end
local fields = {}
for i = 5, #ARGV, 2 do fields[ARGV[i]] = ARGV[i + 1] end
local bad = mistyped({KEYS[2], 'zset', KEYS[3], 'string', KEYS[4], 'stream', KEYS[5], 'zset', KEYS[6], 'zset'})
if bad then return redis.error_reply('the job was not created: ' .. bad) end
prune(10)
redis.call('set', KEYS[3], ARGV[1])  -- also ends an expiry that an ended job of this source set
redis.call('hincrby', METHOD_USERS, fields['method_sha256'], 1)
redis.call('hset', KEYS[1], unpack(ARGV, 5))
redis.call('zadd', KEYS[2], ARGV[2], ARGV[3])
redis.call('zadd', KEYS[5], ARGV[2], ARGV[3])
redis.call('zadd', KEYS[6], ARGV[2], ARGV[3])
redis.call('zadd', IDS, 0, ARGV[3])
move(KEYS[1], ARGV[3], false, 'queued')
redis.call('sadd', QUEUES, fields['route'] or fields['queue'])
redis.call('hincrby', STATS, 'submitted', 1)
event(KEYS[4], ARGV[4], 0)
return 1
