-- A running attempt reports its progress (step, total, loss, ...): kept on the task hash
-- as JSON, fenced by attempt and worker, so a superseded attempt never overwrites the live
-- one's. No event: progress is polled (GET /api/v1/tasks/{id}); the end of a task clears
-- nothing, so the last progress stays readable.
-- KEYS: 1 the task hash
-- ARGV: 1 worker id, 2 attempt, 3 progress JSON, 4 now
local t = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'worker_id')
if t[1] ~= 'RUNNING' or t[2] ~= ARGV[2] or t[3] ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'progress', ARGV[3], 'progress_at', ARGV[4])
return 1
