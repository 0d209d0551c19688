-- The current attempt's process changed (its spare died before the hand-over).
-- KEYS: job. ARGV: attempt, pid.
if not current(KEYS[1], ARGV[1]) then return 0 end
redis.call('hset', KEYS[1], 'pid', ARGV[2])
return 1
