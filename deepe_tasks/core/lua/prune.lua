-- Drop from the indexes up to ARGV[1] jobs whose keys have expired (each transition that ends
-- a job drops a few too); returns how many entries were looked at. No KEYS: the keys it
-- touches are the shared indexes and those named by the entries of the expiring set.
return prune(tonumber(ARGV[1]))
