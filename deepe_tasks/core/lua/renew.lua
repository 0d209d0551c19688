-- running -> running: keep the lease of the current attempt; take it back if it expired and
-- nobody replaced us. KEYS: job, lease. ARGV: attempt, lease value, ttl_ms.
-- 1 renewed, 2 retaken, 0 fenced off.
if not current(KEYS[1], ARGV[1]) then return 0 end
local value = redis.call('get', KEYS[2])
if value == ARGV[2] then redis.call('pexpire', KEYS[2], ARGV[3]) return 1 end
if not value then redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3]) return 2 end
return 0
