-- Move a pipeline's stages and the pipeline itself on, each change only from the state
-- the caller saw (compare and set), so two orchestrators, or one restarted halfway, can
-- never record a stage twice or end a pipeline two ways.
-- KEYS: 1 pipeline hash, 2 pipelines:active
-- ARGV: 1 now, 2 a JSON array of [stage field, the state it must be in, its new record
--       (JSON)], 3 the pipeline's new status ('' to keep it; only a RUNNING pipeline
--       changes), 4 '1' to take the pipeline off pipelines:active (it needs no more work),
--       5 the pipeline's id (taken off pipelines:active even when its hash is gone)
-- Returns {number of stage records changed, the pipeline's status after}.
local changed = 0
for _, u in ipairs(cjson.decode(ARGV[2])) do
  local raw = redis.call('HGET', KEYS[1], u[1])
  if raw and cjson.decode(raw)['state'] == u[2] then
    redis.call('HSET', KEYS[1], u[1], u[3])
    changed = changed + 1
  end
end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  if ARGV[4] == '1' then redis.call('SREM', KEYS[2], ARGV[5]) end  -- the hash is gone
  return {changed, ''}
end
if ARGV[3] ~= '' and status == 'RUNNING' then
  status = ARGV[3]
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', ARGV[1])
end
if changed > 0 or ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
end
if ARGV[4] == '1' then
  redis.call('SREM', KEYS[2], ARGV[5])
end
return {changed, status}
