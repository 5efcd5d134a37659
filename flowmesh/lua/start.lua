-- A worker begins attempts: DISPATCHED -> RUNNING, each fenced by attempt and worker.
-- KEYS: 1 status:DISPATCHED, 2 status:RUNNING, 3 events stream, 4 the worker's task set,
--       5.. task hashes
-- ARGV: 1 worker id, 2 now, 3 events max length, 4 JSON array of [task id, attempt]
--       (strings), one per task hash
-- Returns, per task, 1 (started) or the reason it may not start; the worker must then
-- drop that delivery.
-- Event types: flowmesh/events.py (EventType) lists every one.
local n = #KEYS - 4
local out = {}
local tasks = cjson.decode(ARGV[4])
for i = 1, n do
  local key, id, attempt = KEYS[4 + i], tasks[i][1], tasks[i][2]
  local t = redis.call('HMGET', key, 'status', 'attempts', 'worker_id', 'seq')
  local active = (t[1] == 'DISPATCHED' or t[1] == 'RUNNING')
  if t[2] ~= attempt or t[3] ~= ARGV[1] or not active then
    -- Refused (cancelled, superseded): free this worker's slot, as settle.lua would,
    -- unless a newer attempt of the task holds it here.
    if t[3] ~= ARGV[1] or not active then
      redis.call('SREM', KEYS[4], id)
    end
    out[i] = 'superseded or ended: task is ' .. tostring(t[1]) .. ', attempt ' ..
      tostring(t[2]) .. ' on ' .. tostring(t[3])
  else
    -- RUNNING too: the same worker id, restarted, picks up its own unacked delivery.
    redis.call('HSET', key, 'status', 'RUNNING', 'started_at', ARGV[2], 'updated_at', ARGV[2])
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], t[4], id)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*',
      'type', 'task.started', 'task_id', id, 'attempt', attempt, 'worker_id', ARGV[1])
    out[i] = 1
  end
end
return out
