-- Cancel a task. PENDING: at once. DISPATCHED/RUNNING: the state says CANCELLED now, the
-- caller tells the worker to stop the executor, and the worker's settle (fenced out by
-- the new status) frees the slot. Finished: refused.
-- KEYS: 1 task hash, 2 pending queue, 3 status:PENDING, 4 status:DISPATCHED,
--       5 status:RUNNING, 6 status:CANCELLED, 7 events stream
-- ARGV: 1 task id, 2 now, 3 events max length
-- Returns {1, previous status, worker id, attempt} or {0, current status}.
-- Event types: flowmesh/events.py (EventType) lists every one. Cancelling a DISPATCHED or
-- RUNNING task ends its attempt: the event then says so for the orchestrator's metrics, as
-- settle.lua's do (`executor`, `outcome` cancelled, `wait_sec` and `run_sec`, '' when the
-- attempt had not started).
local t = redis.call('HMGET', KEYS[1], 'status', 'worker_id', 'attempts', 'seq', 'history',
  'pipeline_id', 'executor', 'task_type', 'created_at', 'queued_at', 'started_at')
local status = t[1]
if not status then return {0, 'missing'} end
if status ~= 'PENDING' and status ~= 'DISPATCHED' and status ~= 'RUNNING' then
  return {0, status}
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[6], t[4], ARGV[1])
local fields = {'status', 'CANCELLED', 'finished_at', ARGV[2], 'updated_at', ARGV[2],
  'reason', ''}
local ended = {}  -- the ended attempt, for the event
if status ~= 'PENDING' then
  local executor = t[7]
  if not executor or executor == '' then executor = t[8] or '' end
  local wait_sec, run_sec = '', ''
  local now, started, ready = tonumber(ARGV[2]), tonumber(t[11]), tonumber(t[10] or t[9])
  if started then
    run_sec = string.format('%.6f', math.max(now - started, 0))
    if ready then wait_sec = string.format('%.6f', math.max(started - ready, 0)) end
  end
  ended = {'executor', executor, 'outcome', 'cancelled', 'wait_sec', wait_sec,
    'run_sec', run_sec}
  local history = cjson.decode(t[5] or '[]')
  table.insert(history, {attempt = tonumber(t[3]), worker_id = t[2], ended_at = tonumber(ARGV[2]),
    outcome = 'cancelled', error = ''})
  table.insert(fields, 'history')
  table.insert(fields, cjson.encode(history))
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[3], '*', 'type', 'task.cancelled',
  'task_id', ARGV[1], 'worker_id', t[2] or '', 'attempt', t[3] or '0', 'previous', status,
  'pipeline_id', t[6] or '', unpack(ended))
return {1, status, t[2] or '', t[3] or '0'}
