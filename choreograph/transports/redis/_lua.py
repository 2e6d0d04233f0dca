"""The Lua scripts: every change to a namespace's keys is one script, so it is atomic.

Entries hold one field ``m``, the message record: four big-endian uint32 (the lengths of the
message id, topic, body and target group) then those four strings, exactly as the client packs
them for publish; and ``a``, the attempt, only when it is above 1 (after a retry or a give-back).
Reads return the entries framed in one string: per entry two uint32 (length of the entry id,
attempt), the entry id, the record. One field per entry and one string per reply keep both
Redis's Lua work and the client's parsing small. Dead letters are stored readable, field by field.
"""

from __future__ import annotations

from choreograph.transports.redis import _partition_lua

_MOVE_LIMIT = 500
"""Due retries moved per housekeeping pass (the next pass follows at once when there are more)."""

_LUA_LIB = """
local function record(id, topic, body, target)
  return struct.pack('>IIII', #id, #topic, #body, #target) .. id .. topic .. body .. target
end
local function unrecord(r)
  local li, lt, lb, lg, s = struct.unpack('>IIII', r, 1)
  local id = string.sub(r, s, s + li - 1); s = s + li
  local topic = string.sub(r, s, s + lt - 1); s = s + lt
  return id, topic, string.sub(r, s, s + lb - 1), string.sub(r, s + lb, s + lb + lg - 1)
end
local function add(stream, rec, attempt)
  attempt = tonumber(attempt) or 1
  if attempt > 1 then return redis.call('XADD', stream, '*', 'm', rec, 'a', attempt) end
  return redis.call('XADD', stream, '*', 'm', rec)
end
local function fields(f)
  local m = {}
  for j = 1, #f, 2 do m[f[j]] = f[j + 1] end
  return m
end
local function entry(f)
  if #f == 2 and f[1] == 'm' then return f[2], 1 end
  local m = fields(f)
  return m['m'] or record('', '', '', ''), tonumber(m['a']) or 1
end
local function frame(out, eid, f, extra)
  local rec, attempt = entry(f)
  local k = #out
  out[k + 1] = struct.pack('>II', #eid, attempt + extra)
  out[k + 2] = eid
  out[k + 3] = rec
  return #rec + #eid + 8
end
local function owned(stream, group, eid, consumer)
  return #redis.call('XPENDING', stream, group, eid, eid, 1, consumer) > 0
end
local function take(stream, group, eid)
  local e = redis.call('XRANGE', stream, eid, eid)
  redis.call('XACK', stream, group, eid)
  redis.call('XDEL', stream, eid)
  if #e == 0 then return nil end
  return entry(e[1][2])
end
local function stream_of(prefix, group, part)
  if part and part ~= '' then return prefix .. 'g:' .. group .. ':' .. part end
  return prefix .. 'g:' .. group
end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
"""

# KEYS: groups set, stream, partitions hash | ARGV: prefix, group, partitions (0: none), topics...
# Returns the group's partitions as stored (0: not partitioned); a mismatch declares nothing.
_DECLARE = """
local function create(stream)
  local r = redis.pcall('XGROUP', 'CREATE', stream, ARGV[2], '0', 'MKSTREAM')
  if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP', 1, true) then
    return r
  end
end
local n = tonumber(ARGV[3])
if n > 0 then redis.call('HSETNX', KEYS[3], ARGV[2], n) end
local stored = tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0')
if stored ~= n then return stored end
local err = create(KEYS[2])
if err then return err end
for p = 0, n - 1 do
  err = create(KEYS[2] .. ':' .. p)
  if err then return err end
end
redis.call('SADD', KEYS[1], ARGV[2])
for i = 4, #ARGV do redis.call('SADD', ARGV[1] .. 't:' .. ARGV[i], ARGV[2]) end
return n
"""

# ARGV: prefix, the records of the messages, one after the other, and the hash of each one's
# partition key (one big-endian uint32 per record; '' when the publisher sent none): a partitioned
# group gets the message in the stream of partition hash % partitions. Without the hashes, a
# message for a partitioned group makes the script return -1 having added nothing (the publisher
# then sends them).
_PUBLISH = """
local prefix, data, hashes = ARGV[1], ARGV[2], ARGV[3]
local pos, size, cache, parts, k, adds = 1, #data, {}, {}, 0, {}
local function stream(group, h)
  local n = parts[group]
  if n == nil then
    n = tonumber(redis.call('HGET', prefix .. 'parts', group) or '0')
    parts[group] = n
  end
  if n == 0 then return prefix .. 'g:' .. group end
  if not h then return nil end
  return prefix .. 'g:' .. group .. ':' .. (h % n)
end
while pos <= size do
  local li, lt, lb, lg, s = struct.unpack('>IIII', data, pos)
  local last = s + li + lt + lb + lg - 1
  local rec = string.sub(data, pos, last)
  k = k + 1
  local h = nil
  if hashes ~= '' then h = struct.unpack('>I', hashes, 4 * k - 3) end
  local groups
  if lg > 0 then
    groups = {string.sub(data, last - lg + 1, last)}
  else
    local topic = string.sub(data, s + li, s + li + lt - 1)
    groups = cache[topic]
    if not groups then
      groups = redis.call('SMEMBERS', prefix .. 't:' .. topic)
      cache[topic] = groups
    end
  end
  for j = 1, #groups do
    local target = stream(groups[j], h)
    if not target then return -1 end
    adds[#adds + 1] = target
    adds[#adds + 1] = rec
  end
  pos = last + 1
end
for j = 1, #adds, 2 do redis.call('XADD', adds[j], '*', 'm', adds[j + 1]) end
return #adds / 2
"""

# ARGV: prefix, target group ('' for every group of the topic), id, topic, body, reason,
# error type, error, failed at
# A message too big to publish: a dead letter (attempts 0) for each group it was meant for.
_BURY_UNSENT = """
local prefix, target, topic = ARGV[1], ARGV[2], ARGV[4]
local groups = {target}
if target == '' then groups = redis.call('SMEMBERS', prefix .. 't:' .. topic) end
for k = 1, #groups do
  redis.call('XADD', prefix .. 'dlq:' .. groups[k], '*', 'id', ARGV[3], 'topic', topic,
             'body', ARGV[5], 'group', groups[k], 'reason', ARGV[6], 'error_type', ARGV[7],
             'error', ARGV[8], 'attempts', 0, 'failed_at', ARGV[9])
end
return #groups
"""

# KEYS: stream | ARGV: group, consumer, count, byte budget
_READ = """
local out, n, bytes = {}, 0, 0
local want, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local step = math.min(want, 32)
while n < want and bytes < budget do
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', step,
                       'STREAMS', KEYS[1], '>')
  if not r then break end
  local entries = r[1][2]
  for i = 1, #entries do
    bytes = bytes + frame(out, entries[i][1], entries[i][2], 0)
  end
  n = n + #entries
  if #entries < step then break end
  step = math.max(1, math.min(want - n, math.floor((budget - bytes) * n / bytes)))
end
return table.concat(out)
"""

# KEYS: stream, delayed, delayed counts | ARGV: prefix, group, me, my lease ms, want, reap ms
# Moves due retries (of every group) to their streams, then takes over this group's deliveries
# whose holder's lease ran out (each holder's lease is in its consumer name: "...~<ms>").
_HOUSEKEEP = """
local now = now_us()
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now),
                       'LIMIT', 0, __MOVE_LIMIT__)
for i = 1, #due do
  local r = cmsgpack.unpack(due[i])
  add(stream_of(ARGV[1], r[1], r[5]), r[3], r[2])
  if redis.call('HINCRBY', KEYS[3], r[1], -1) <= 0 then redis.call('HDEL', KEYS[3], r[1]) end
  redis.call('ZREM', KEYS[2], due[i])
end
local wait = -1
if #due == __MOVE_LIMIT__ then
  wait = 0
else
  local head = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if head[2] then wait = math.max(0, tonumber(head[2]) - now) end
end
local out, got, want = {}, 0, tonumber(ARGV[5])
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[2])
if consumers.err then return redis.error_reply('NOGROUP ' .. consumers.err) end
for i = 1, #consumers do
  local c = fields(consumers[i])
  local name, pending = c['name'], tonumber(c['pending'])
  if pending > 0 and got < want then
    local lease = tonumber(string.match(name, '~(%d+)$')) or tonumber(ARGV[4])
    local expired = redis.call('XPENDING', KEYS[1], ARGV[2], 'IDLE', lease, '-', '+',
                               want - got, name)
    if #expired > 0 then
      local ids, counts = {}, {}
      for j = 1, #expired do
        ids[j] = expired[j][1]
        counts[expired[j][1]] = expired[j][4]
      end
      local claimed = redis.call('XCLAIM', KEYS[1], ARGV[2], ARGV[3], lease, unpack(ids))
      for j = 1, #claimed do
        local e = claimed[j]
        if e then
          frame(out, e[1], e[2], counts[e[1]])
          got = got + 1
        end
      end
    end
  elseif pending == 0 and tonumber(c['idle']) > tonumber(ARGV[6]) and name ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[2], name)
  end
end
return {string.format('%.0f', wait), table.concat(out)}
""".replace("__MOVE_LIMIT__", str(_MOVE_LIMIT))

# KEYS: stream | ARGV: group, entry ids...
_ACK = """
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
return n
"""

# KEYS: stream, delayed, delayed counts | ARGV: group, consumer, entry id, next attempt, delay µs,
# partition ('' when the group is not partitioned)
_RETRY = """
local group, me, eid = ARGV[1], ARGV[2], ARGV[3]
if not owned(KEYS[1], group, eid, me) then return 0 end
local rec = take(KEYS[1], group, eid)
if not rec then return 0 end
local delay = tonumber(ARGV[5])
if delay <= 0 then
  add(KEYS[1], rec, ARGV[4])
else
  local due = string.format('%.0f', now_us() + delay)
  local r = {group, ARGV[4], rec, eid}
  if ARGV[6] and ARGV[6] ~= '' then r[5] = ARGV[6] end
  redis.call('ZADD', KEYS[2], due, cmsgpack.pack(r))
  redis.call('HINCRBY', KEYS[3], group, 1)
end
return 1
"""

# KEYS: stream, dead letters | ARGV: group, consumer, entry id, attempts, reason, error type,
# error, failed at, traceback, partition ('' when the group is not partitioned)
_DEAD_LETTER = """
local group, me, eid = ARGV[1], ARGV[2], ARGV[3]
if not owned(KEYS[1], group, eid, me) then return 0 end
local rec = take(KEYS[1], group, eid)
if not rec then return 0 end
local id, topic, body = unrecord(rec)
local f = {'id', id, 'topic', topic, 'body', body, 'group', group, 'reason', ARGV[5],
           'error_type', ARGV[6], 'error', ARGV[7], 'attempts', ARGV[4], 'failed_at', ARGV[8],
           'traceback', ARGV[9]}
if ARGV[10] and ARGV[10] ~= '' then
  f[#f + 1] = 'partition'
  f[#f + 1] = ARGV[10]
end
redis.call('XADD', KEYS[2], '*', unpack(f))
return 1
"""

# KEYS: stream | ARGV: group, consumer, (entry id, attempt)...
# Gives a closing member's unsettled deliveries back: each goes to the end of the stream, with its
# attempt unchanged, where any member (blocked readers included) takes it at once.
_RELEASE = """
local group, me = ARGV[1], ARGV[2]
for i = 3, #ARGV, 2 do
  if owned(KEYS[1], group, ARGV[i], me) then
    local rec = take(KEYS[1], group, ARGV[i])
    if rec then add(KEYS[1], rec, ARGV[i + 1]) end
  end
end
if #redis.call('XPENDING', KEYS[1], group, '-', '+', 1, me) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], group, me)
end
return 1
"""

# KEYS: dead letters, stream | ARGV: dead letter entry id, group, has body, body
# A dead letter of a partition goes back to that partition's stream.
_REPLAY = """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return 0 end
local m = fields(e[1][2])
local body = m['body'] or ''
if ARGV[3] == '1' then body = ARGV[4] end
local stream = KEYS[2]
if m['partition'] then stream = stream .. ':' .. m['partition'] end
add(stream, record(m['id'] or '', m['topic'] or '', body, ARGV[2]), 1)
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""

# KEYS: delayed counts, the group's streams (its partitions' when partitioned) | ARGV: group
_LAG = """
local waiting = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return -1 end
  local pending = redis.pcall('XPENDING', KEYS[i], ARGV[1])
  if pending.err then return -1 end
  waiting = waiting + redis.call('XLEN', KEYS[i]) - pending[1]
end
return waiting + tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
"""


SCRIPTS: dict[str, str] = {
    name: source if name == "lag" else _LUA_LIB + source
    for name, source in (
        ("declare", _DECLARE),
        ("publish", _PUBLISH),
        ("bury_unsent", _BURY_UNSENT),
        ("read", _READ),
        ("housekeep", _HOUSEKEEP),
        ("ack", _ACK),
        ("retry", _RETRY),
        ("dead_letter", _DEAD_LETTER),
        ("release", _RELEASE),
        ("replay", _REPLAY),
        ("lag", _LAG),
        ("balance", _partition_lua.BALANCE),
        ("takeover", _partition_lua.TAKEOVER),
        ("read_partitions", _partition_lua.READ),
        ("leave", _partition_lua.LEAVE),
    )
}
"""Every script by the name the transport runs it under, with the functions it uses in front."""
