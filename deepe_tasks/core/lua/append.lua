-- Events of the current attempt, each once. KEYS: events. ARGV: job key, attempt, then seq and
-- event pairs, seqs rising. Returns how many were appended, -1 if the attempt is fenced off.
-- The job process runs this and check.lua with a user that may only read the job's record and
-- lease: Redis checks the keys declared in KEYS for write access, so the record's key comes in
-- ARGV, and Redis checks each command of the script on its own.
if not current(ARGV[1], ARGV[2]) then return -1 end
local last = 0
local top = redis.call('xrevrange', KEYS[1], '+', '-', 'COUNT', 1)
if top[1] then
  local f, a, s = top[1][2], nil, nil
  for i = 1, #f, 2 do
    if f[i] == 'a' then a = f[i + 1] elseif f[i] == 's' then s = f[i + 1] end
  end
  if a == ARGV[2] and s then last = tonumber(s) end
end
local n = 0
for i = 3, #ARGV, 2 do
  if tonumber(ARGV[i]) > last then
    redis.call('xadd', KEYS[1], 'MAXLEN', '~', MAXLEN, '*', 'data', ARGV[i + 1], 'a', ARGV[2], 's', ARGV[i])
    n = n + 1
  end
end
return n
