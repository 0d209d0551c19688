-- The running set holds running jobs only. KEYS: job, running. ARGV: id.
if redis.call('hget', KEYS[1], 'status') == 'running' then return 0 end
return redis.call('srem', KEYS[2], ARGV[1])
