-- May the current attempt publish its model now? Only while its lease has at least ARGV[4] ms
-- left, so no other attempt can be claimed before the rename that follows is done.
-- No KEYS: the job process's user may only read the record and the lease, and Redis checks
-- the keys declared in KEYS for write access (see append.lua).
-- ARGV: job key, lease key, attempt, min_ttl_ms. 1 yes, 0 fenced off, -1 lease too short.
if not current(ARGV[1], ARGV[3]) then return 0 end
local value = redis.call('get', ARGV[2])
if not value or string.sub(value, 1, #ARGV[3] + 1) ~= ARGV[3] .. ':' then return -1 end
if redis.call('pttl', ARGV[2]) < tonumber(ARGV[4]) then return -1 end
return 1
