-- One page of job ids, newest first, from the index KEYS[1] starting at rank ARGV[1]: those
-- also in KEYS[2] (when given), at most ARGV[2] of them, looking at no more than ARGV[3]
-- entries. Returns the next rank (-1: the end), then the ids.
local rank, limit, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
while #out < limit and budget > 0 do
  local ids = redis.call('zrevrange', KEYS[1], rank, rank + math.min(budget, 500) - 1)
  if #ids == 0 then return {-1, unpack(out)} end
  for _, id in ipairs(ids) do
    rank, budget = rank + 1, budget - 1
    if not KEYS[2] or redis.call('zscore', KEYS[2], id) then
      out[#out + 1] = id
      if #out == limit then break end
    end
  end
end
if rank >= redis.call('zcard', KEYS[1]) then rank = -1 end
return {rank, unpack(out)}
