-- A busy worker reads new inbox entries and begins their attempts in one call: the
-- XREADGROUP of its inbox loop and start.lua's step, without the round trip between them.
-- Each attempt is fenced and started exactly as start.lua does it (see there).
-- Event types: flowmesh/events.py (EventType) lists every one.
-- KEYS: 1 the worker's inbox stream, 2 status:DISPATCHED, 3 status:RUNNING, 4 events
--       stream, 5 the worker's task set
-- ARGV: 1 the inbox's group, 2 worker id (its consumer), 3 count, 4 now, 5 events max
--       length, 6 the task key prefix ('<prefix>task:'), 7 JSON array of the ids of the
--       tasks that have an attempt on this worker now
-- Returns {entries, outcomes}: the entries as XREADGROUP gives them (id, flat field
-- list), and per entry, per attempt it carries (one, or each child of a merged
-- delivery), 1 (started), 0 (not started: its task still has an attempt here, which
-- must end first; the worker reads the entry again later, by id, through start.lua) or
-- the reason it may not start.
--
-- Only new entries ('>'): a re-read of the worker's own pending entries goes through
-- XREADGROUP and start.lua, since the worker skips the attempts it is already running
-- there. The task hashes are named by the entries, so they cannot be declared in KEYS:
-- like every FlowMesh script, this one needs all of a fleet's keys on one Redis.
local worker, now = ARGV[2], ARGV[4]
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], worker, 'COUNT', ARGV[3],
  'STREAMS', KEYS[1], '>')
if not reply then return {{}, {}} end
local entries = reply[1][2]
local here = {}
for _, id in ipairs(cjson.decode(ARGV[7])) do here[id] = true end
local outcomes = {}
for e, entry in ipairs(entries) do
  local flat, f = entry[2], {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  local attempts = {}
  if f['merge_children'] and f['merge_children'] ~= '' then
    for i, c in ipairs(cjson.decode(f['merge_children'])) do
      attempts[i] = {tostring(c['task_id']), tostring(c['attempt'])}
    end
  else
    attempts[1] = {f['task_id'], f['attempt']}
  end
  local out = {}
  for i, a in ipairs(attempts) do
    local id, attempt = a[1], a[2]
    local key = ARGV[6] .. id
    local t = redis.call('HMGET', key, 'status', 'attempts', 'worker_id', 'seq')
    local active = (t[1] == 'DISPATCHED' or t[1] == 'RUNNING')
    if here[id] then
      out[i] = 0
    elseif t[2] ~= attempt or t[3] ~= worker or not active then
      if t[3] ~= worker or not active then
        redis.call('SREM', KEYS[5], id)
      end
      out[i] = 'superseded or ended: task is ' .. tostring(t[1]) .. ', attempt ' ..
        tostring(t[2]) .. ' on ' .. tostring(t[3])
    else
      redis.call('HSET', key, 'status', 'RUNNING', 'started_at', now, 'updated_at', now)
      redis.call('ZREM', KEYS[2], id)
      redis.call('ZADD', KEYS[3], t[4], id)
      redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*',
        'type', 'task.started', 'task_id', id, 'attempt', attempt, 'worker_id', worker)
      out[i] = 1
    end
  end
  outcomes[e] = out
end
return {entries, outcomes}
