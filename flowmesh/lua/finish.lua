-- A worker records the outcome of an attempt and acks its delivery, atomically:
-- the inbox entry is acked only together with the result it produced.
-- KEYS: 1 task hash, 2 status:DISPATCHED, 3 status:RUNNING, 4 status:<outcome>,
--       5 worker's task set, 6 inbox stream, 7 events stream
-- ARGV: 1 task id, 2 attempt, 3 worker id, 4 outcome (DONE|FAILED), 5 result json,
--       6 error json, 7 now, 8 inbox entry id, 9 inbox group, 10 events max length
-- Returns {1} or {0, reason}. A superseded attempt changes nothing but its own ack.
redis.call('XACK', KEYS[6], ARGV[9], ARGV[8])
local t = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'worker_id', 'seq')
if t[2] ~= ARGV[2] or t[3] ~= ARGV[3] or (t[1] ~= 'RUNNING' and t[1] ~= 'DISPATCHED') then
  -- Free this worker's slot unless a newer attempt of the task holds it here.
  if t[3] ~= ARGV[3] or (t[1] ~= 'RUNNING' and t[1] ~= 'DISPATCHED') then
    redis.call('SREM', KEYS[5], ARGV[1])
  end
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[10], '*',
    'type', 'task.stale', 'task_id', ARGV[1], 'attempt', ARGV[2], 'worker_id', ARGV[3])
  return {0, 'superseded: task is ' .. tostring(t[1]) .. ', attempt ' .. tostring(t[2]) ..
    ' on ' .. tostring(t[3])}
end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'result', ARGV[5], 'error', ARGV[6],
  'finished_at', ARGV[7], 'updated_at', ARGV[7])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], t[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[10], '*',
  'type', 'task.finished', 'task_id', ARGV[1], 'attempt', ARGV[2], 'worker_id', ARGV[3],
  'status', ARGV[4])
return {1}
