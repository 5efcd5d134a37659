-- End one attempt of a task, atomically: record it in the task's history, free the
-- worker's slot, ack the inbox entry, then DONE, or retry (PENDING, after a backoff),
-- or FAILED and dead-lettered. Fenced: a superseded attempt changes nothing but its ack.
-- KEYS: 1 task hash, 2 status:DISPATCHED, 3 status:RUNNING, 4 status:PENDING,
--       5 status:DONE, 6 status:FAILED, 7 pending queue, 8 dead-letter set,
--       9 worker's task set, 10 events stream, 11 the caller's inbox stream
-- ARGV: 1 task id, 2 attempt, 3 worker id, 4 now, 5 outcome (DONE|FAILED),
--       6 result json, 7 error json, 8 error kind, 9 retryable (1|0),
--       10 charge (1: counts toward maxAttempts), 11 immediate (1: no backoff),
--       12 avoid (1: prefer another worker next time), 13 jitter in [0,1),
--       14 inbox group, 15 events max length, 16 the caller's inbox entry id ('' for none)
-- Returns {1, new status} or {0, reason}.
local now = tonumber(ARGV[4])
local t = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'worker_id', 'seq', 'failures',
  'max_attempts', 'priority', 'retry_backoff', 'history', 'dispatched_at', 'started_at',
  'avoid_workers')
local status = t[1]
local active = (status == 'DISPATCHED' or status == 'RUNNING')
if ARGV[16] ~= '' then
  redis.call('XACK', KEYS[11], ARGV[14], ARGV[16])
end
if t[2] ~= ARGV[2] or t[3] ~= ARGV[3] or not active then
  -- Free this worker's slot unless a newer attempt of the task holds it here.
  if t[3] ~= ARGV[3] or not active then
    redis.call('SREM', KEYS[9], ARGV[1])
  end
  redis.call('XADD', KEYS[10], 'MAXLEN', '~', ARGV[15], '*',
    'type', 'task.stale', 'task_id', ARGV[1], 'attempt', ARGV[2], 'worker_id', ARGV[3])
  return {0, 'superseded: task is ' .. tostring(status) .. ', attempt ' .. tostring(t[2]) ..
    ' on ' .. tostring(t[3])}
end

local history = cjson.decode(t[9] or '[]')
local err_message = ''
if ARGV[7] ~= '' then err_message = cjson.decode(ARGV[7])['message'] or '' end
table.insert(history, {attempt = tonumber(ARGV[2]), worker_id = ARGV[3],
  dispatched_at = tonumber(t[10]), started_at = tonumber(t[11]), ended_at = now,
  outcome = (ARGV[5] == 'DONE') and 'done' or ARGV[8], error = err_message})
local seq = t[4]
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[9], ARGV[1])
redis.call('HSET', KEYS[1], 'history', cjson.encode(history), 'updated_at', now,
  'last_worker_id', ARGV[3])

local function event(kind, new_status)
  redis.call('XADD', KEYS[10], 'MAXLEN', '~', ARGV[15], '*', 'type', kind,
    'task_id', ARGV[1], 'attempt', ARGV[2], 'worker_id', ARGV[3], 'status', new_status)
end

if ARGV[5] == 'DONE' then
  redis.call('HSET', KEYS[1], 'status', 'DONE', 'result', ARGV[6], 'error', '',
    'finished_at', now)
  redis.call('ZADD', KEYS[5], seq, ARGV[1])
  event('task.finished', 'DONE')
  return {1, 'DONE'}
end

local failures = tonumber(t[5] or '0') + tonumber(ARGV[10])
local max_attempts = tonumber(t[6] or '3')
if ARGV[9] == '1' and failures < max_attempts then
  local delay = 0
  if ARGV[11] ~= '1' and failures > 0 then
    local base = tonumber(t[8] or '1')
    delay = math.min(base * 2 ^ (failures - 1), 300) * (0.5 + 0.5 * tonumber(ARGV[13]))
  end
  local avoid = t[12] or ''
  if ARGV[12] == '1' and not string.find(',' .. avoid .. ',', ',' .. ARGV[3] .. ',', 1, true) then
    avoid = (avoid == '') and ARGV[3] or (avoid .. ',' .. ARGV[3])
  end
  local reason = 'retry after ' .. ARGV[8] .. ' (' .. failures .. ' of ' .. max_attempts ..
    ' failures allowed)'
  if ARGV[10] == '0' then reason = 'requeued after ' .. ARGV[8] .. ' (not counted)' end
  redis.call('HSET', KEYS[1], 'status', 'PENDING', 'failures', failures, 'error', ARGV[7],
    'retry_at', now + delay, 'avoid_workers', avoid, 'worker_id', '', 'reason', reason)
  redis.call('ZADD', KEYS[4], seq, ARGV[1])
  redis.call('ZADD', KEYS[7], (1000 - tonumber(t[7] or '0')) * 1e12 + tonumber(seq), ARGV[1])
  event('task.retry', 'PENDING')
  return {1, 'PENDING'}
end

redis.call('HSET', KEYS[1], 'status', 'FAILED', 'failures', failures, 'error', ARGV[7],
  'finished_at', now)
redis.call('ZADD', KEYS[6], seq, ARGV[1])
redis.call('ZADD', KEYS[8], now, ARGV[1])
event('task.finished', 'FAILED')
return {1, 'FAILED'}
