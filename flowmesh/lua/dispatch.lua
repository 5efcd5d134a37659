-- Place PENDING tasks on workers: the one atomic step from queue to inbox, for a batch.
-- KEYS: 1 pending queue, 2 status:PENDING, 3 status:DISPATCHED, then per worker:
--       its hash, heartbeat, task set and inbox stream, followed by each of its tasks'
--       hash and spec key
-- ARGV: 1 now (epoch seconds), 2 JSON array of [worker id, [delivery, ...]] in KEYS
--       order, a delivery being an array of task ids: one task, or the tasks of a merged
--       delivery (the first is its parent)
-- Returns, per task in order, its attempt number (placed) or the reason it was not.
--
-- A merged delivery is one inbox entry for the parent with `merge_children`: a JSON
-- array of {task_id, attempt, spec, timeout_sec, identity, created_at}, one per task
-- placed (the parent first). Each task is DISPATCHED on its own, with `merge_parent`
-- and `merge_group` (the ids delivered together) for its status; the worker acks the
-- entry when the last of them is settled.
local out = {}
local k = 4
local now = ARGV[1]
for _, group in ipairs(cjson.decode(ARGV[2])) do
  local worker, deliveries = group[1], group[2]
  local whash, beat, tasks, inbox = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local refuse = nil
  if redis.call('EXISTS', beat) == 0 then
    refuse = 'worker heartbeat expired'
  else
    local w = redis.call('HMGET', whash, 'status', 'disabled')
    if w[1] ~= 'idle' and w[1] ~= 'busy' then
      refuse = 'worker is ' .. tostring(w[1])
    elseif w[2] == '1' then
      refuse = 'worker is disabled'
    end
  end
  -- Slots plus prefetch: the scheduler keeps a task that reserves CPU, RAM or GPU within
  -- the slots; this is the outer bound, whatever the orchestrator's view was.
  local cap = redis.call('HMGET', whash, 'slots', 'prefetch')
  local free = tonumber(cap[1] or '0') + tonumber(cap[2] or '0') - redis.call('SCARD', tasks)
  local j = k + 4  -- this worker's first task hash
  for _, ids in ipairs(deliveries) do
    local placed = {}  -- {id, key, attempt, fields} of the tasks this delivery carries
    for i = 1, #ids do
      local key, id = KEYS[j], ids[i]
      local t = redis.call('HMGET', key, 'status', 'spec', 'seq', 'task_type', 'timeout_sec',
        'executor', 'identity', 'created_at')
      -- The spec has a key of its own; a task stored before it had kept it in the hash.
      t[2] = redis.call('GET', KEYS[j + 1]) or t[2]
      j = j + 2
      local result
      if t[1] ~= 'PENDING' then
        result = 'task is ' .. tostring(t[1])
      elseif refuse then
        result = refuse
      elseif free <= 0 then
        result = 'worker has no free slot'
      else
        free = free - 1
        result = redis.call('HINCRBY', key, 'attempts', 1)
        placed[#placed + 1] = {id, key, result, t}
      end
      out[#out + 1] = result
    end
    if #placed > 0 then
      local lead = placed[1]
      local t = lead[4]
      local executor = t[6]
      if not executor or executor == '' then executor = t[4] or '' end
      local fields = {'task_id', lead[1], 'attempt', lead[3], 'task_type', executor,
        'timeout_sec', t[5] or '', 'identity', t[7] or '', 'created_at', t[8] or '',
        'spec', t[2]}
      local ids_placed = {}
      if #placed > 1 then
        local children = {}
        for i, p in ipairs(placed) do
          ids_placed[i] = p[1]
          children[i] = {task_id = p[1], attempt = p[3], spec = p[4][2],
            timeout_sec = p[4][5] or '', identity = p[4][7] or '', created_at = p[4][8] or ''}
        end
        fields[#fields + 1] = 'merge_children'
        fields[#fields + 1] = cjson.encode(children)
      end
      local sid = redis.call('XADD', inbox, '*', unpack(fields))
      local group_json = (#placed > 1) and cjson.encode(ids_placed) or ''
      for _, p in ipairs(placed) do
        local id, key = p[1], p[2]
        redis.call('HSET', key, 'status', 'DISPATCHED', 'worker_id', worker, 'inbox', inbox,
          'stream_id', sid, 'dispatched_at', now, 'updated_at', now, 'reason', '',
          'merge_parent', (#placed > 1) and lead[1] or '', 'merge_group', group_json)
        redis.call('HDEL', key, 'started_at', 'retry_at')
        redis.call('ZREM', KEYS[1], id)
        redis.call('ZREM', KEYS[2], id)
        redis.call('ZADD', KEYS[3], p[4][3], id)
        redis.call('SADD', tasks, id)
      end
    end
  end
  k = j
end
return out
