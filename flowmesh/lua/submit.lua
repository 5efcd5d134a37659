-- Store a batch of new PENDING tasks, all at once or none. With an idempotency key seen
-- before, store nothing: for the same request (same hash) return the ids stored the first
-- time; for a different request refuse. With a pipeline stage named, store nothing unless
-- the pipeline is RUNNING and the stage still `waiting`: a stage is released once, by
-- whichever orchestrator gets there first.
-- KEYS: 1 task sequence counter, 2 tasks:all, 3 status:PENDING, 4 pending queue,
--       5 idempotency key (unused when ARGV[3] is ''), 6 pipeline hash (unused when
--       ARGV[6] is ''), then per task its hash and its spec key
-- ARGV: 1 now, 2 idempotency ttl (seconds), 3 the new ids as JSON for the idempotency
--       key ('' for none), 4 a JSON array with, per task, an array of 17 strings: task id,
--       name, task type, priority, max attempts, retry backoff, timeout ('' for none),
--       spec json (to the spec key), requirements json, executor, merge key and identity ('' for none),
--       pipeline id, stage, item index, preferred workers (comma-separated), why
--       (the last five '' outside a pipeline; empty ones are not stored), 5 the request's
--       hash (sha256 hex of its canonical specs; '' without a key), 6 the stage's field
--       in the pipeline hash ('' for none), 7 the stage's record (JSON) to write there
-- Returns {1, first sequence number, {each task's queue score}}, {0, ids stored the first
-- time (JSON)} for a replay, {-1, ids stored the first time} when the key was stored
-- for a different request, or {-2, why} when the stage was not released.
--
-- The idempotency key is a hash: `request_sha256` and `task_ids` (JSON), with the TTL. A
-- plain string there (the ids alone, written before the hash was kept) is replayed as it
-- used to be: it has no hash to compare, and expires within the TTL.
--
-- The queue score is computed here and nowhere else: ascending order is higher priority
-- first, then older first. It is stored in the task hash (`score`) for settle.lua and
-- requeue_dead.lua to re-queue with, and for TaskStore to read; it goes as a string with
-- every digit ('%.0f'), since a Lua number returned to Redis is cut to an integer and one
-- formatted with tostring() keeps only 14 digits. (1000 - priority) * 1e12 + seq is an
-- integer below 2^53 (priority in [-1000, 1000], seq < 1e12), so a double holds it exactly.
local n = (#KEYS - 6) / 2
if ARGV[3] ~= '' then
  local kind = redis.call('TYPE', KEYS[5])['ok']
  if kind == 'hash' then
    local seen = redis.call('HMGET', KEYS[5], 'request_sha256', 'task_ids')
    if seen[1] ~= ARGV[5] then return {-1, seen[2] or '[]'} end
    return {0, seen[2] or '[]'}
  elseif kind == 'string' then
    return {0, redis.call('GET', KEYS[5])}
  end
end
if ARGV[6] ~= '' then
  local p = redis.call('HMGET', KEYS[6], 'status', ARGV[6])
  if p[1] ~= 'RUNNING' then return {-2, 'pipeline is ' .. tostring(p[1])} end
  if not p[2] then return {-2, 'no such stage'} end
  local state = cjson.decode(p[2])['state']
  if state ~= 'waiting' then return {-2, 'stage is ' .. tostring(state)} end
end
local first = redis.call('INCRBY', KEYS[1], n) - n + 1
local tasks = cjson.decode(ARGV[4])
local optional = {'pipeline_id', 'stage', 'item', 'prefer', 'prefer_why'}
local scores = {}
for i = 1, n do
  local a = tasks[i]
  local id, priority, seq = a[1], tonumber(a[4]), first + i - 1
  local score = string.format('%.0f', (1000 - priority) * 1e12 + seq)
  scores[i] = score
  local key = KEYS[5 + 2 * i]
  redis.call('SET', KEYS[6 + 2 * i], a[8])
  redis.call('HSET', key, 'task_id', id, 'name', a[2], 'task_type', a[3],
    'status', 'PENDING', 'priority', a[4], 'seq', seq, 'score', score, 'attempts', 0,
    'failures', 0, 'max_attempts', a[5], 'retry_backoff', a[6], 'timeout_sec', a[7],
    'requirements', a[9], 'executor', a[10], 'merge_key', a[11], 'identity', a[12],
    'history', '[]', 'created_at', ARGV[1], 'updated_at', ARGV[1])
  for j = 1, 5 do
    local v = a[12 + j]
    if v ~= nil and v ~= '' then redis.call('HSET', key, optional[j], v) end
  end
  redis.call('ZADD', KEYS[2], seq, id)
  redis.call('ZADD', KEYS[3], seq, id)
  redis.call('ZADD', KEYS[4], score, id)
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[5], 'request_sha256', ARGV[5], 'task_ids', ARGV[3])
  redis.call('EXPIRE', KEYS[5], ARGV[2])
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[6], ARGV[6], ARGV[7], 'updated_at', ARGV[1])
end
return {1, first, scores}
