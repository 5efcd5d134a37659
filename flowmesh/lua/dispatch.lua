-- Place a PENDING task on a worker: the one atomic step from queue to inbox.
-- KEYS: 1 task hash, 2 pending queue, 3 status:PENDING, 4 status:DISPATCHED,
--       5 worker hash, 6 worker heartbeat, 7 worker's task set, 8 worker inbox stream
-- ARGV: 1 task id, 2 worker id, 3 now (epoch seconds)
-- Returns {1, attempt, stream id} or {0, reason}.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'PENDING' then
  return {0, 'task is ' .. tostring(status)}
end
if redis.call('EXISTS', KEYS[6]) == 0 then
  return {0, 'worker heartbeat expired'}
end
local wstatus = redis.call('HGET', KEYS[5], 'status')
if wstatus ~= 'idle' and wstatus ~= 'busy' then
  return {0, 'worker is ' .. tostring(wstatus)}
end
local slots = tonumber(redis.call('HGET', KEYS[5], 'slots') or '0')
if redis.call('SCARD', KEYS[7]) >= slots then
  return {0, 'worker has no free slot'}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local spec = redis.call('HGET', KEYS[1], 'spec')
local seq = redis.call('HGET', KEYS[1], 'seq')
local id = redis.call('XADD', KEYS[8], '*',
  'task_id', ARGV[1], 'attempt', attempt, 'spec', spec)
redis.call('HSET', KEYS[1], 'status', 'DISPATCHED', 'worker_id', ARGV[2],
  'inbox', KEYS[8], 'stream_id', id, 'dispatched_at', ARGV[3], 'updated_at', ARGV[3],
  'reason', '')
redis.call('HDEL', KEYS[1], 'started_at', 'retry_at')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('SADD', KEYS[7], ARGV[1])
return {1, attempt, id}
