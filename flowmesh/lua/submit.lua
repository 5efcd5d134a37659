-- Store a batch of new PENDING tasks, all at once or none. With an idempotency key seen
-- before, store nothing: for the same request (same hash) return the ids stored the first
-- time; for a different request refuse.
-- KEYS: 1 task sequence counter, 2 tasks:all, 3 status:PENDING, 4 pending queue,
--       5 idempotency key (unused when ARGV[3] is ''), 6.. task hashes
-- ARGV: 1 now, 2 idempotency ttl (seconds), 3 the new ids as JSON for the idempotency
--       key ('' for none), 4 a JSON array with, per task, an array of 12 strings: task id,
--       name, task type, priority, max attempts, retry backoff, timeout ('' for none),
--       spec json, requirements json, executor, merge key and identity ('' for none), 5 the request's hash (sha256 hex of its canonical
--       specs; '' without a key)
-- Returns {1, first sequence number, {each task's queue score}}, {0, ids stored the first
-- time (JSON)} for a replay, or {-1, ids stored the first time} when the key was stored
-- for a different request.
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
local n = #KEYS - 5
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
local first = redis.call('INCRBY', KEYS[1], n) - n + 1
local tasks = cjson.decode(ARGV[4])
local scores = {}
for i = 1, n do
  local a = tasks[i]
  local id, priority, seq = a[1], tonumber(a[4]), first + i - 1
  local score = string.format('%.0f', (1000 - priority) * 1e12 + seq)
  scores[i] = score
  redis.call('HSET', KEYS[5 + i], 'task_id', id, 'name', a[2], 'task_type', a[3],
    'status', 'PENDING', 'priority', a[4], 'seq', seq, 'score', score, 'attempts', 0,
    'failures', 0, 'max_attempts', a[5], 'retry_backoff', a[6], 'timeout_sec', a[7], 'spec', a[8],
    'requirements', a[9], 'executor', a[10], 'merge_key', a[11], 'identity', a[12],
    'history', '[]', 'created_at', ARGV[1], 'updated_at', ARGV[1])
  redis.call('ZADD', KEYS[2], seq, id)
  redis.call('ZADD', KEYS[3], seq, id)
  redis.call('ZADD', KEYS[4], score, id)
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[5], 'request_sha256', ARGV[5], 'task_ids', ARGV[3])
  redis.call('EXPIRE', KEYS[5], ARGV[2])
end
return {1, first, scores}
