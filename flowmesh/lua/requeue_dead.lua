-- Put a dead-lettered (FAILED) task back in the queue with a fresh failure budget.
-- KEYS: 1 task hash, 2 dead-letter set, 3 status:FAILED, 4 status:PENDING,
--       5 pending queue, 6 events stream
-- ARGV: 1 task id, 2 now, 3 events max length
-- Returns {1} or {0, reason}.
-- Event types: flowmesh/events.py (EventType) lists every one.
if redis.call('ZSCORE', KEYS[2], ARGV[1]) == false then
  return {0, 'not in the dead-letter set'}
end
local t = redis.call('HMGET', KEYS[1], 'status', 'seq', 'score')
if t[1] ~= 'FAILED' then return {0, 'task is ' .. tostring(t[1])} end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], t[2], ARGV[1])
redis.call('ZADD', KEYS[5], t[3], ARGV[1])  -- the queue score submit.lua stored
redis.call('HSET', KEYS[1], 'status', 'PENDING', 'failures', 0, 'retry_at', ARGV[2],
  'queued_at', ARGV[2], 'avoid_workers', '', 'worker_id', '', 'updated_at', ARGV[2], 'finished_at', '',
  'reason', 'requeued from the dead-letter set')
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[3], '*', 'type', 'task.retry',
  'task_id', ARGV[1], 'status', 'PENDING')
return {1}
