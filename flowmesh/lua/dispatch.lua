-- Place PENDING tasks on workers: the one atomic step from queue to inbox, for a batch.
-- KEYS: 1 pending queue, 2 status:PENDING, 3 status:DISPATCHED, then per worker:
--       its hash, heartbeat, task set and inbox stream, followed by its tasks' hashes
-- ARGV: 1 now (epoch seconds), 2 JSON array of [worker id, [task ids]], in KEYS order
-- Returns, per task in order, its attempt number (placed) or the reason it was not.
local out = {}
local k = 4
for _, group in ipairs(cjson.decode(ARGV[2])) do
  local worker, ids = group[1], group[2]
  local count = #ids
  local whash, beat, tasks, inbox = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local refuse = nil
  if redis.call('EXISTS', beat) == 0 then
    refuse = 'worker heartbeat expired'
  else
    local wstatus = redis.call('HGET', whash, 'status')
    if wstatus ~= 'idle' and wstatus ~= 'busy' then
      refuse = 'worker is ' .. tostring(wstatus)
    end
  end
  local free = tonumber(redis.call('HGET', whash, 'slots') or '0') - redis.call('SCARD', tasks)
  for i = 1, count do
    local key, id = KEYS[k + 3 + i], ids[i]
    local t = redis.call('HMGET', key, 'status', 'spec', 'seq', 'task_type', 'timeout_sec')
    local result
    if t[1] ~= 'PENDING' then
      result = 'task is ' .. tostring(t[1])
    elseif refuse then
      result = refuse
    elseif free <= 0 then
      result = 'worker has no free slot'
    else
      free = free - 1
      result = redis.call('HINCRBY', key, 'attempts', 1)
      local sid = redis.call('XADD', inbox, '*', 'task_id', id, 'attempt', result,
        'task_type', t[4] or '', 'timeout_sec', t[5] or '', 'spec', t[2])
      redis.call('HSET', key, 'status', 'DISPATCHED', 'worker_id', worker, 'inbox', inbox,
        'stream_id', sid, 'dispatched_at', ARGV[1], 'updated_at', ARGV[1], 'reason', '')
      redis.call('HDEL', key, 'started_at', 'retry_at')
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZREM', KEYS[2], id)
      redis.call('ZADD', KEYS[3], t[3], id)
      redis.call('SADD', tasks, id)
    end
    out[#out + 1] = result
  end
  k = k + 4 + count
end
return out
