-- A worker begins an attempt: DISPATCHED -> RUNNING, fenced by attempt and worker.
-- KEYS: 1 task hash, 2 status:DISPATCHED, 3 status:RUNNING, 4 events stream,
--       5 the worker's task set
-- ARGV: 1 task id, 2 attempt, 3 worker id, 4 now, 5 events max length
-- Returns {1} or {0, reason}; on 0 the worker must drop the delivery.
local t = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'worker_id', 'seq')
local active = (t[1] == 'DISPATCHED' or t[1] == 'RUNNING')
if t[2] ~= ARGV[2] or t[3] ~= ARGV[3] or not active then
  -- Refused (cancelled, superseded): free this worker's slot, as settle.lua would,
  -- unless a newer attempt of the task holds it here.
  if t[3] ~= ARGV[3] or not active then
    redis.call('SREM', KEYS[5], ARGV[1])
  end
  return {0, 'superseded or ended: task is ' .. tostring(t[1]) .. ', attempt ' ..
    tostring(t[2]) .. ' on ' .. tostring(t[3])}
end
-- RUNNING too: the same worker id, restarted, picks up its own unacked delivery.
redis.call('HSET', KEYS[1], 'status', 'RUNNING', 'started_at', ARGV[4], 'updated_at', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], t[4], ARGV[1])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*',
  'type', 'task.started', 'task_id', ARGV[1], 'attempt', ARGV[2], 'worker_id', ARGV[3])
return {1}
