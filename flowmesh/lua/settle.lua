-- End attempts of tasks, each atomically: record it in the task's history, free the
-- worker's slot, ack the inbox entry, then DONE, or retry (PENDING, after a backoff),
-- or FAILED and dead-lettered. Fenced: a superseded attempt changes nothing but its ack.
-- KEYS: 1 status:DISPATCHED, 2 status:RUNNING, 3 status:PENDING, 4 status:DONE,
--       5 status:FAILED, 6 pending queue, 7 dead-letter set, 8 worker's task set,
--       9 events stream, 10 the caller's inbox stream, 11.. task hashes
-- ARGV: 1 worker id, 2 now, 3 inbox group, 4 events max length, 5 a JSON array with, per
--       task, an array of 12 strings: task id, attempt, outcome (DONE|FAILED), result json,
--       error json, error kind, retryable (1|0), charge (1: counts toward maxAttempts),
--       immediate (1: no backoff), avoid (1: prefer another worker next time), jitter in
--       [0,1), the caller's inbox entry id ('' for none). One argument, not 12 per task:
--       the client packs each argument in Python, the JSON in C.
-- Returns, per task, {1, new status} or {0, reason}.
-- Event types: flowmesh/events.py (EventType) lists every one. task.finished and
-- task.retry also say how the attempt went, for the orchestrator's metrics
-- (orchestrator/task_stats.py): `executor`, `outcome` (done, or the failure kind),
-- `wait_sec` (queued, or back from a retry's backoff, to started) and `run_sec` (started
-- to ended), both '' for an attempt that never started; and `executed_by` when a DONE
-- task's result came from an identical task's run (task merge).
local worker, now = ARGV[1], tonumber(ARGV[2])
local n = #KEYS - 10
local out = {}

local function event(kind, id, attempt, new_status, pipeline, extra)
  local fields = {'type', kind, 'task_id', id, 'attempt', attempt, 'worker_id', worker,
    'status', new_status}
  if pipeline then
    -- the orchestrator re-evaluates the task's pipeline at once (pipelines.py)
    fields[#fields + 1] = 'pipeline_id'
    fields[#fields + 1] = pipeline
  end
  for _, v in ipairs(extra) do fields[#fields + 1] = v end
  redis.call('XADD', KEYS[9], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
end

-- The id of the task whose run a result came from (the worker adds `executed_by` to an
-- identical task's copy), or nil. Decoded only when the text names the field at all.
local function executed_by(result)
  if not string.find(result, '"executed_by"', 1, true) then return nil end
  local ok, decoded = pcall(cjson.decode, result)
  if ok and type(decoded) == 'table' and type(decoded['executed_by']) == 'string' then
    return decoded['executed_by']
  end
  return nil
end

local function settle(key, a)
  -- a: this task's 12 arguments
  local id, attempt = a[1], a[2]
  local t = redis.call('HMGET', key, 'status', 'attempts', 'worker_id', 'seq', 'failures',
    'max_attempts', 'score', 'retry_backoff', 'history', 'dispatched_at', 'started_at',
    'avoid_workers', 'pipeline_id', 'executor', 'task_type', 'created_at', 'queued_at')
  local status = t[1]
  local active = (status == 'DISPATCHED' or status == 'RUNNING')
  if a[12] ~= '' then
    redis.call('XACK', KEYS[10], ARGV[3], a[12])
  end
  if t[2] ~= attempt or t[3] ~= worker or not active then
    -- Free this worker's slot unless a newer attempt of the task holds it here.
    if t[3] ~= worker or not active then
      redis.call('SREM', KEYS[8], id)
    end
    redis.call('XADD', KEYS[9], 'MAXLEN', '~', ARGV[4], '*',
      'type', 'task.stale', 'task_id', id, 'attempt', attempt, 'worker_id', worker)
    return {0, 'superseded: task is ' .. tostring(status) .. ', attempt ' .. tostring(t[2]) ..
      ' on ' .. tostring(t[3])}
  end

  local history = cjson.decode(t[9] or '[]')
  local err_message = ''
  if a[5] ~= '' then err_message = cjson.decode(a[5])['message'] or '' end
  local outcome = (a[3] == 'DONE') and 'done' or a[6]
  table.insert(history, {attempt = tonumber(attempt), worker_id = worker,
    dispatched_at = tonumber(t[10]), started_at = tonumber(t[11]), ended_at = now,
    outcome = outcome, error = err_message})
  -- What the event says about the attempt (the metrics): its executor, how it ended, how
  -- long it waited to start since the task was ready to run (`queued_at`, set when it came
  -- back from a retry; else submitted) and how long it ran. Clocks of different machines:
  -- clamped at 0.
  local executor = t[14]
  if not executor or executor == '' then executor = t[15] or '' end
  local wait_sec, run_sec = '', ''
  local started, ready = tonumber(t[11]), tonumber(t[17] or t[16])
  if started then
    run_sec = string.format('%.6f', math.max(now - started, 0))
    if ready then wait_sec = string.format('%.6f', math.max(started - ready, 0)) end
  end
  local extra = {'executor', executor, 'outcome', outcome, 'wait_sec', wait_sec,
    'run_sec', run_sec}
  local seq = t[4]
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('SREM', KEYS[8], id)
  redis.call('HSET', key, 'history', cjson.encode(history), 'updated_at', now,
    'last_worker_id', worker)

  if a[3] == 'DONE' then
    redis.call('HSET', key, 'status', 'DONE', 'result', a[4], 'error', '', 'finished_at', now)
    redis.call('ZADD', KEYS[4], seq, id)
    local by = executed_by(a[4])
    if by then
      extra[#extra + 1] = 'executed_by'
      extra[#extra + 1] = by
    end
    event('task.finished', id, attempt, 'DONE', t[13], extra)
    return {1, 'DONE'}
  end

  local failures = tonumber(t[5] or '0') + tonumber(a[8])
  local max_attempts = tonumber(t[6] or '3')
  if a[7] == '1' and failures < max_attempts then
    local delay = 0
    if a[9] ~= '1' and failures > 0 then
      local base = tonumber(t[8] or '1')
      delay = math.min(base * 2 ^ (failures - 1), 300) * (0.5 + 0.5 * tonumber(a[11]))
    end
    local avoid = t[12] or ''
    if a[10] == '1' and not string.find(',' .. avoid .. ',', ',' .. worker .. ',', 1, true) then
      avoid = (avoid == '') and worker or (avoid .. ',' .. worker)
    end
    local reason = 'retry after ' .. a[6] .. ' (' .. failures .. ' of ' .. max_attempts ..
      ' failures allowed)'
    if a[8] == '0' then reason = 'requeued after ' .. a[6] .. ' (not counted)' end
    -- queued_at: when the task is ready to run again, the start of its next queue wait.
    redis.call('HSET', key, 'status', 'PENDING', 'failures', failures, 'error', a[5],
      'retry_at', now + delay, 'queued_at', string.format('%.6f', now + delay),
      'avoid_workers', avoid, 'worker_id', '', 'reason', reason)
    redis.call('ZADD', KEYS[3], seq, id)
    redis.call('ZADD', KEYS[6], t[7], id)  -- the queue score submit.lua stored
    event('task.retry', id, attempt, 'PENDING', nil, extra)
    return {1, 'PENDING'}
  end

  redis.call('HSET', key, 'status', 'FAILED', 'failures', failures, 'error', a[5],
    'finished_at', now)
  redis.call('ZADD', KEYS[5], seq, id)
  redis.call('ZADD', KEYS[7], now, id)
  event('task.finished', id, attempt, 'FAILED', t[13], extra)
  return {1, 'FAILED'}
end

local tasks = cjson.decode(ARGV[5])
for i = 1, n do
  out[i] = settle(KEYS[10 + i], tasks[i])
end
return out
