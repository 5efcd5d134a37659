-- Place PENDING tasks on one worker: the one atomic step from queue to inbox, for a batch.
-- KEYS: 1 pending queue, 2 status:PENDING, 3 status:DISPATCHED, 4 worker hash,
--       5 worker heartbeat, 6 worker's task set, 7 worker inbox stream, 8.. task hashes
-- ARGV: 1 worker id, 2 now (epoch seconds), 3.. task ids (one per task hash)
-- Returns, per task, its attempt number (placed) or the reason it was not placed.
local n = #KEYS - 7
local out = {}
local refuse = nil
if redis.call('EXISTS', KEYS[5]) == 0 then
  refuse = 'worker heartbeat expired'
else
  local wstatus = redis.call('HGET', KEYS[4], 'status')
  if wstatus ~= 'idle' and wstatus ~= 'busy' then
    refuse = 'worker is ' .. tostring(wstatus)
  end
end
local free = tonumber(redis.call('HGET', KEYS[4], 'slots') or '0') - redis.call('SCARD', KEYS[6])
for i = 1, n do
  local key, id = KEYS[7 + i], ARGV[2 + i]
  local t = redis.call('HMGET', key, 'status', 'spec', 'seq', 'task_type', 'timeout_sec')
  if t[1] ~= 'PENDING' then
    out[i] = 'task is ' .. tostring(t[1])
  elseif refuse then
    out[i] = refuse
  elseif free <= 0 then
    out[i] = 'worker has no free slot'
  else
    free = free - 1
    local attempt = redis.call('HINCRBY', key, 'attempts', 1)
    local sid = redis.call('XADD', KEYS[7], '*', 'task_id', id, 'attempt', attempt,
      'task_type', t[4] or '', 'timeout_sec', t[5] or '', 'spec', t[2])
    redis.call('HSET', key, 'status', 'DISPATCHED', 'worker_id', ARGV[1], 'inbox', KEYS[7],
      'stream_id', sid, 'dispatched_at', ARGV[2], 'updated_at', ARGV[2], 'reason', '')
    redis.call('HDEL', key, 'started_at', 'retry_at')
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[3], t[3], id)
    redis.call('SADD', KEYS[6], id)
    out[i] = attempt
  end
end
return out
