"""The Lua scripts of key-partitioned groups (``partitioned=``): partition leases, reads of the
partitions a member holds, and the takeover of a partition's unsettled entries.

A partitioned group ``<group>`` with ``n`` partitions has the streams ``{ns}:g:<group>:<p>``
(``p`` from 0 to ``n - 1``, each with the consumer group ``<group>``), and:

===============================  ================================================================
``{ns}:parts``                   hash group -> its number of partitions
``{ns}:part:<group>:<p>``        the lease of partition ``p``: the holding member's consumer name
                                 (``<name>#drain`` while it finishes what it holds before letting
                                 go), expiring unless renewed
``{ns}:members:<group>``         sorted set of the live members, score = when their lease ends (ms)
===============================  ================================================================
"""

from __future__ import annotations

# ARGV: prefix, group, partitions, me, lease ms, partitions a read of mine is blocked on...
# Renews this member, forgets members whose lease ran out, and moves this member towards its fair
# share (ceil(partitions / live members)): a surplus partition is marked draining (no longer
# read) and let go once this member holds nothing of it; free partitions are taken.
# Returns {the partitions this member reads, those of them it has just taken}.
BALANCE = """
local prefix, group, me = ARGV[1], ARGV[2], ARGV[4]
local n, lease = tonumber(ARGV[3]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local members = prefix .. 'members:' .. group
redis.call('ZADD', members, now + lease, me)
redis.call('ZREMRANGEBYSCORE', members, '-inf', now)
local fair = math.ceil(n / redis.call('ZCARD', members))
local draining = me .. '#drain'
local busy = {}
for i = 6, #ARGV do busy[ARGV[i]] = true end
local base = prefix .. 'part:' .. group .. ':'
local mine, free, taken = {}, {}, {}
for p = 0, n - 1 do
  local v = redis.call('GET', base .. p)
  if v == me then
    mine[#mine + 1] = p
  elseif v == draining then
    local stream = prefix .. 'g:' .. group .. ':' .. p
    if not busy[tostring(p)]
        and #redis.call('XPENDING', stream, group, '-', '+', 1, me) == 0 then
      redis.call('DEL', base .. p)
    else
      redis.call('PEXPIRE', base .. p, lease)
    end
  elseif not v then
    free[#free + 1] = p
  end
end
while #mine > fair do
  redis.call('SET', base .. table.remove(mine), draining, 'PX', lease)
end
for i = 1, #mine do redis.call('PEXPIRE', base .. mine[i], lease) end
local i = 1
while #mine < fair and i <= #free do
  redis.call('SET', base .. free[i], me, 'PX', lease)
  mine[#mine + 1] = free[i]
  taken[#taken + 1] = free[i]
  i = i + 1
end
return {mine, taken}
"""

# KEYS: partition stream | ARGV: group, me, want, the partition's lease key
# Takes over what other members left unsettled in a partition this member has just taken, oldest
# first (their place in the partition), as a redelivery (attempt + 1). Returns {1 when there may
# be more, the framed entries}; {0, ''} when the partition is no longer this member's.
TAKEOVER = """
local group, me, want = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('GET', ARGV[4]) ~= me then return {0, ''} end
local ids, counts, start = {}, {}, '-'
while #ids < want do
  local page = redis.call('XPENDING', KEYS[1], group, start, '+', 100)
  for j = 1, #page do
    local e = page[j]
    if e[2] ~= me and #ids < want then
      ids[#ids + 1] = e[1]
      counts[e[1]] = e[4]
    end
  end
  if #page < 100 then break end
  start = '(' .. page[#page][1]
end
local out = {}
if #ids > 0 then
  local claimed = redis.call('XCLAIM', KEYS[1], group, me, 0, unpack(ids))
  for j = 1, #claimed do
    local e = claimed[j]
    if e then frame(out, e[1], e[2], counts[e[1]]) end
  end
end
return {#ids == want and 1 or 0, table.concat(out)}
"""

# ARGV: prefix, group, me, want, partitions...
# New entries of the given partitions this member holds (a partition it no longer holds is
# skipped). Returns {partition, framed entries, partition, framed entries, ...}.
READ = """
local prefix, group, me = ARGV[1], ARGV[2], ARGV[3]
local want, n, out = tonumber(ARGV[4]), 0, {}
for i = 5, #ARGV do
  if n >= want then break end
  local p = ARGV[i]
  if redis.call('GET', prefix .. 'part:' .. group .. ':' .. p) == me then
    local r = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', want - n,
                         'STREAMS', prefix .. 'g:' .. group .. ':' .. p, '>')
    if r then
      local framed, entries = {}, r[1][2]
      for j = 1, #entries do frame(framed, entries[j][1], entries[j][2], 0) end
      n = n + #entries
      out[#out + 1] = p
      out[#out + 1] = table.concat(framed)
    end
  end
end
return out
"""

# ARGV: prefix, group, partitions, me
# A member leaving: it is no longer counted, and its partitions are free at once. What it held
# unsettled stays in place, for the next holder to take over first.
LEAVE = """
local prefix, group, me = ARGV[1], ARGV[2], ARGV[4]
redis.call('ZREM', prefix .. 'members:' .. group, me)
local base = prefix .. 'part:' .. group .. ':'
for p = 0, tonumber(ARGV[3]) - 1 do
  local v = redis.call('GET', base .. p)
  if v == me or v == me .. '#drain' then redis.call('DEL', base .. p) end
end
return 1
"""
