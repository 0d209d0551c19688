-- A running attempt is over without an end of its own: its worker shut down or lost Redis
-- (the attempt itself asks, with ARGV[3] = '0'), or its lease expired (the reaper asks, with
-- ARGV[3] = '1', and a live lease wins). A plain cancel that waits makes it cancelled; a loss
-- (ARGV[11] = '1': anything but a preemption announced by SIGTERM) counts toward
-- DEEPE_MAX_RESUMES, past which it fails; else it is queued again.
-- A requeued job goes into the unsent set until its message is sent. The same requeue sent
-- again after a lost reply gets the same answer, writing nothing.
-- KEYS: job, running, lease, events, cancel flag, unsent. ARGV: attempt, id, lease must be gone,
-- max resumes, now, cancelled error, cancelled event, failed error, failed event, requeued
-- event, a loss ('1' or '0'), retention.
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
if outcome ~= 'queued' then ended(KEYS[1], ARGV[2], KEYS[4], KEYS[5], outcome, ARGV[5], ARGV[12]) end
return outcome
