-- Store a new RUNNING pipeline with every stage `waiting`, or, with an idempotency key
-- seen before, nothing (the first request's pipeline id comes back).
-- KEYS: 1 pipeline hash, 2 pipelines:all, 3 pipelines:active, 4 pipelines:seq,
--       5 idempotency key (unused when ARGV[3] is '')
-- ARGV: 1 now, 2 idempotency ttl, 3 '1' with an idempotency key else '', 4 the request's
--       hash, 5 pipeline id, 6 name, 7 the plan (JSON), 8 a JSON array of the stages'
--       field names, 9 the waiting stage record (JSON)
-- Returns {1, seq}, {0, the first request's pipeline id}, or {-1, that id} when the key
-- was used for a different request.
if ARGV[3] ~= '' then
  local kind = redis.call('TYPE', KEYS[5])['ok']
  if kind == 'hash' then
    local seen = redis.call('HMGET', KEYS[5], 'request_sha256', 'pipeline_id')
    -- a key a task submit stored (no pipeline_id) is another request's
    if not seen[2] or seen[1] ~= ARGV[4] then return {-1, seen[2] or ''} end
    return {0, seen[2]}
  elseif kind ~= 'none' then
    return {-1, ''}
  end
end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'pipeline_id', ARGV[5], 'name', ARGV[6], 'status', 'RUNNING',
  'seq', seq, 'plan', ARGV[7], 'created_at', ARGV[1], 'updated_at', ARGV[1])
for _, field in ipairs(cjson.decode(ARGV[8])) do
  redis.call('HSET', KEYS[1], field, ARGV[9])
end
redis.call('ZADD', KEYS[2], seq, ARGV[5])
redis.call('SADD', KEYS[3], ARGV[5])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[5], 'request_sha256', ARGV[4], 'pipeline_id', ARGV[5])
  redis.call('EXPIRE', KEYS[5], ARGV[2])
end
return {1, seq}
