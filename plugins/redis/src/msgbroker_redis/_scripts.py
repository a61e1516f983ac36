"""The Lua scripts of the Redis provider.

Everything that must be atomic runs as one script: a publish with its dedup marker and the
trim, a read or settle together with the check that the caller still holds the lane's lease
(the fence against a paused old owner), a dead letter together with its ack.
"""

from __future__ import annotations

__all__ = [
    "ACK",
    "ACQUIRE",
    "ACQUIRE_MANY",
    "CANCEL_SCHEDULED",
    "CREATE_GROUPS",
    "DEAD_LETTER",
    "DESCRIBE",
    "HEARTBEAT",
    "MOVE_DUE",
    "PEEK",
    "PENDING",
    "PUBLISH",
    "READ",
    "RELEASE",
    "RENEW",
    "RETRY",
    "SCHEDULE",
    "TOPIC_META",
    "UNREAD",
]

# Shared helpers. Stream ids are "<ms>-<seq>"; both parts fit a Lua double exactly for any
# id Redis generates from a clock.
_PRELUDE = r"""
local function id_parts(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

local function id_less(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end

local function id_next(id)
  local m, s = id_parts(id)
  return string.format('%.0f-%.0f', m, s + 1)
end

-- A topic's readers wait on one stream, <base>:notify, rather than on each idle lane: every
-- call that appends to lane streams adds one entry there naming the lanes ("3,17,900").
-- Capped: a reader that falls further behind looks at all its lanes once.
local NOTIFY_LEN = 1000
local function notify(base, lanes)
  redis.call('XADD', base .. ':notify', 'MAXLEN', '~', NOTIFY_LEN, '*', 'p', lanes)
end

local function fields(flat)
  local out = {}
  for i = 1, #flat, 2 do out[flat[i]] = flat[i + 1] end
  return out
end

-- Trim settled history beyond maxlen, never an entry a group has not settled: MAXLEN alone
-- deletes pending entries (redis#5570). The cut is the oldest entry any group still needs
-- (its oldest pending entry, or the one after its last delivered) or the maxlen bound,
-- whichever is lower. Work is O(entries trimmed), so amortised O(1) per published entry.
local function trim(key, maxlen, slack)
  local len = redis.call('XLEN', key)
  if len <= maxlen + slack then return 0 end
  local need = nil
  for _, raw in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local g = fields(raw)
    local oldest
    if g['pending'] > 0 then
      oldest = redis.call('XPENDING', key, g['name'], '-', '+', 1)[1][1]
    else
      oldest = id_next(g['last-delivered-id'])
    end
    if need == nil or id_less(oldest, need) then need = oldest end
  end
  local excess = len - maxlen
  local upto = '+'
  if need ~= nil then upto = '(' .. need end
  local below = redis.call('XRANGE', key, '-', upto, 'COUNT', excess + 1)
  if #below == 0 then return 0 end
  local minid
  if #below > excess then minid = below[excess + 1][1] else minid = need end
  return redis.call('XTRIM', key, 'MINID', minid)
end

-- One bulk string per lane instead of a dozen nested replies per entry: parsing RESP is
-- what a Python client spends its time on. Each entry: delivery count and field count
-- (4-byte big-endian), then id, not-before and each field and value, length-prefixed.
local function pack(out, id, flat, delivered, not_before)
  out[#out + 1] = struct.pack('>I4I4', delivered, #flat / 2)
  out[#out + 1] = struct.pack('>I4', #id) .. id
  out[#out + 1] = struct.pack('>I4', #not_before) .. not_before
  for _, part in ipairs(flat) do
    out[#out + 1] = struct.pack('>I4', #part) .. part
  end
end

local function holds(lease, token)
  return token == '' or redis.call('GET', lease) == token
end
"""

TOPIC_META = r"""
-- KEYS[1] the topic's meta hash; ARGV[1] partition count. Returns the count on record.
redis.call('HSETNX', KEYS[1], 'partitions', ARGV[1])
return redis.call('HGET', KEYS[1], 'partitions')
"""

CREATE_GROUPS = r"""
-- KEYS[1] meta hash, KEYS[2..] the lane streams; ARGV[1] group, ARGV[2] partition count.
-- Creates the group on every lane at 0 (so what was published before is received).
-- Returns the partition count on record.
redis.call('HSETNX', KEYS[1], 'partitions', ARGV[2])
local recorded = redis.call('HGET', KEYS[1], 'partitions')
if recorded ~= ARGV[2] then return recorded end
for i = 2, #KEYS do
  local r = redis.pcall('XGROUP', 'CREATE', KEYS[i], ARGV[1], '0', 'MKSTREAM')
  if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP', 1, true) then
    return redis.error_reply(r.err)
  end
end
return recorded
"""

PUBLISH = _PRELUDE + r"""
-- ARGV: the topic's key base ("<prefix>:{<topic>}"), maxlen, slack, dedup window ms (0: off),
-- the records packed into one string: per record its partition (4-byte big-endian), then id,
-- key, headers and body, each with a 4-byte big-endian length. One call covers every lane of
-- a batch (lane and dedup keys are derived here): a batch spread over 64 partitions would
-- otherwise be 64 calls, and encoding arguments is what a Python client spends its time on.
-- Each lane touched is trimmed afterwards. Returns how many records were appended.
local base = ARGV[1]
local maxlen, slack, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local data = ARGV[5]
local pos = 1
local function take()
  local n = struct.unpack('>I4', data, pos)
  local s = string.sub(data, pos + 4, pos + 3 + n)
  pos = pos + 4 + n
  return s
end
local added = 0
local touched = {}
while pos <= #data do
  local partition = struct.unpack('>I4', data, pos)
  pos = pos + 4
  local id, key, headers, body = take(), take(), take(), take()
  local fresh = true
  if window > 0 then fresh = redis.call('SET', base .. ':dedup:' .. id, '1', 'NX', 'PX', window) end
  if fresh then
    local stream = base .. ':' .. partition
    if headers == '' then
      redis.call('XADD', stream, '*', 'i', id, 'k', key, 'b', body)
    else
      redis.call('XADD', stream, '*', 'i', id, 'k', key, 'h', headers, 'b', body)
    end
    touched[stream] = partition
    added = added + 1
  end
end
local lanes = {}
for stream, partition in pairs(touched) do
  trim(stream, maxlen, slack)
  lanes[#lanes + 1] = partition
end
if added > 0 then notify(base, table.concat(lanes, ',')) end
return added
"""

READ = _PRELUDE + r"""
-- ARGV: group, the topic's key base ("<prefix>:{<topic>}"), partition count, count per lane,
-- the lanes as "<partition> <lease token, - for none> <cursor>;..." (the last id handed to the
-- caller), the most entries to return in all (lanes past it answer "more": one call that
-- packs a whole backlog of a thousand lanes would hold the server for seconds), the caller's
-- cursor in the topic's notify stream ('' at first: then only its last id is returned).
-- The lane keys are derived here rather than passed: a poll covers up to every lane of the
-- topic, and encoding three keys per lane per poll cost the client more than the read.
-- Per lane, the consumer's (= the partition's) pending entries after the cursor come first (a
-- new owner's history, or entries whose reply was lost), then new ones.
-- Returns one string: the new notify cursor (length-prefixed), 1 when notifications may have
-- been missed (the stream was trimmed past the cursor) else 0, the lanes notified since the
-- cursor as "p,p,..." (length-prefixed); then per lane: partition, status (0 ok, 1 more history
-- left: poll again at once, 2 fenced: the lease is gone, 3 drained: this read took everything
-- the lane had, so the caller reads it again only once a notification names it) and the
-- length of the packed entries as 4-byte big-endian, then the packed entries.
-- ARGV[8] '1': the lanes are idle ones (the caller's wait, pipelined behind its blocking read
-- of the notify stream): only those the notifications since the cursor name are read, and the
-- lanes come as "<partition> <token>;..." with the token's common start in ARGV[9] ("<token>"
-- is ARGV[9] .. what follows the partition, "-" for none). An idle lane's last read took
-- everything it had, so it has no history after its cursor and none is sent: the wait's
-- arguments stay small however many lanes a member holds (on a thousand lanes the cursors and
-- whole tokens were ~66 kB per wait, and a script's cost grows with the bytes it is handed).
local group, base, partitions, count = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local budget = tonumber(ARGV[6])
local cursor, missed, notified = ARGV[7], 0, {}
local notify_key = base .. ':notify'
if cursor == '' then
  local last = redis.call('XREVRANGE', notify_key, '+', '-', 'COUNT', 1)
  if #last > 0 then cursor = last[1][1] else cursor = '0-0' end
else
  local first = redis.call('XRANGE', notify_key, '-', '+', 'COUNT', 1)
  if #first > 0 and cursor ~= first[1][1] and id_less(cursor, first[1][1]) and cursor ~= '0-0' then missed = 1 end
  for _ = 1, 10 do
    local got = redis.call('XRANGE', notify_key, id_next(cursor), '+', 'COUNT', 500)
    for _, e in ipairs(got) do
      cursor = e[1]
      local f = e[2]
      for i = 1, #f, 2 do
        if f[i] == 'p' then
          for p in string.gmatch(f[i + 1], '%d+') do notified[p] = true end
        end
      end
    end
    if #got < 500 then break end
    if _ == 10 then missed = 1 end
  end
end
local lanes_notified = {}
for p in pairs(notified) do lanes_notified[#lanes_notified + 1] = p end
local notified_text = table.concat(lanes_notified, ',')
local meta = base .. ':meta'

local function readgroup(stream, consumer, n, from)
  local r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n, 'STREAMS', stream, from)
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'NOGROUP', 1, true) then error(r) end
    -- The stream or the group is gone (server flushed or restarted without data): recreate.
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    redis.call('HSETNX', meta, 'partitions', partitions)
    r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n, 'STREAMS', stream, from)
  end
  if not r then return {} end
  return r[1][2]
end

local out = {struct.pack('>I4', #cursor) .. cursor .. struct.pack('>I4I4', missed, #notified_text) .. notified_text}
local function read_lane(consumer, token, cursor)
  if token == '-' then token = '' end
  -- cursor nil: an idle lane (see ARGV[8]), read from its new entries
  local stream = base .. ':' .. consumer
  local delay = base .. ':delay:' .. group .. ':' .. consumer
  local status = 0
  local packed = {}
  if budget <= 0 then
    status = 1
  elseif not holds(base .. ':lease:' .. group .. ':' .. consumer, token) then
    status = 2
  else
    local n = math.min(count, budget)
    local history = {}
    if cursor then history = readgroup(stream, consumer, n, cursor) end
    local kept = {}
    for _, e in ipairs(history) do
      if e[2] then
        kept[#kept + 1] = e
      else
        -- The entry was deleted under its pending record (XDEL, or MAXLEN by another client).
        redis.call('XACK', stream, group, e[1])
        redis.call('HDEL', delay, e[1])
      end
    end
    if #kept > 0 then
      local counts = {}
      local pel = redis.call('XPENDING', stream, group, kept[1][1], kept[#kept][1], #history, consumer)
      for _, p in ipairs(pel) do counts[p[1]] = p[4] end
      local waits = {}
      if redis.call('EXISTS', delay) == 1 then
        local ids = {}
        for i, e in ipairs(kept) do ids[i] = e[1] end
        waits = redis.call('HMGET', delay, unpack(ids))
      end
      for i, e in ipairs(kept) do pack(packed, e[1], e[2], counts[e[1]] or 1, waits[i] or '') end
    end
    budget = budget - #history
    if #history >= n then
      status = 1
    else
      local fresh = readgroup(stream, consumer, n - #history, '>')
      budget = budget - #fresh
      for _, e in ipairs(fresh) do pack(packed, e[1], e[2] or {}, 1, '') end
      -- Fewer than asked: the lane has nothing more now, and whatever is appended after this
      -- run adds a notification after the cursor returned below (what the caller blocks on).
      if #fresh < n - #history then status = 3 end
    end
  end
  local entries = table.concat(packed)
  out[#out + 1] = struct.pack('>I4I4I4', tonumber(consumer), status, #entries)
  out[#out + 1] = entries
end
if ARGV[8] == '1' then
  local prefix, lanes = ARGV[9], ARGV[5]
  local function token_of(rest)
    if rest == '-' then return rest end
    return prefix .. rest
  end
  if missed == 0 then
    -- Find each notified lane in the list (a plain search, no copy of the list: copying it
    -- cost as much as the read) rather than walk a thousand lanes.
    for p in pairs(notified) do
      local at = 1
      if string.sub(lanes, 1, #p + 1) ~= p .. ' ' then
        at = string.find(lanes, ';' .. p .. ' ', 1, true)
        if at then at = at + 1 end
      end
      if at then
        local consumer, rest = string.match(lanes, '^(%d+) ([^;]+)', at)
        read_lane(consumer, token_of(rest), nil)
      end
    end
  else
    for consumer, rest in string.gmatch(lanes, '(%d+) ([^;]+)') do read_lane(consumer, token_of(rest), nil) end
  end
else
  for consumer, token, cursor in string.gmatch(ARGV[5], '(%d+) (%S+) ([^;]+)') do read_lane(consumer, token, cursor) end
end
return table.concat(out)
"""

ACK = _PRELUDE + r"""
-- KEYS: the topic's meta hash (routes the call; the lanes' keys are derived from the base, in
-- its slot: encoding three keys per lane cost the client more than the acks).
-- ARGV: group, the topic's key base, the lanes as "<partition> <token, - for none> <id> <id>...;...".
-- Returns the partitions whose lease is gone: their acks are dropped (the new owner
-- redelivers; a zombie never settles what another member holds).
local group, base = ARGV[1], ARGV[2]
local fenced = {}
for lane in string.gmatch(ARGV[3], '[^;]+') do
  local partition, token, rest = string.match(lane, '^(%d+) (%S+)(.*)$')
  if token == '-' then token = '' end
  if holds(base .. ':lease:' .. group .. ':' .. partition, token) then
    local stream, delay = base .. ':' .. partition, base .. ':delay:' .. group .. ':' .. partition
    local ids = {}
    for id in string.gmatch(rest, '%S+') do ids[#ids + 1] = id end
    local has_delay = redis.call('EXISTS', delay) == 1
    for first = 1, #ids, 500 do
      local last = math.min(first + 499, #ids)
      redis.call('XACK', stream, group, unpack(ids, first, last))
      if has_delay then redis.call('HDEL', delay, unpack(ids, first, last)) end
    end
  else
    fenced[#fenced + 1] = tonumber(partition)
  end
end
return fenced
"""

RETRY = _PRELUDE + r"""
-- KEYS: stream, lease, delay hash. ARGV: group, consumer, token, id, attempt, not_before ('' none),
-- failures ('' unknown).
-- Persists the attempt as the entry's delivery count (XCLAIM RETRYCOUNT to the same consumer)
-- and, in the lane's delay hash, "<not_before>;<failures>:<attempt>" (the attempt record), so a
-- new owner after a crash knows the delay and how many attempts failed.
if not holds(KEYS[2], ARGV[3]) then return -1 end
local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[4], 'RETRYCOUNT', ARGV[5], 'JUSTID')
local value = ARGV[6]
if ARGV[7] ~= '' then value = value .. ';' .. ARGV[7] .. ':' .. ARGV[5] end
if value == '' then
  redis.call('HDEL', KEYS[3], ARGV[4])
else
  redis.call('HSET', KEYS[3], ARGV[4], value)
end
return #claimed
"""

DEAD_LETTER = _PRELUDE + r"""
-- KEYS: stream, lease, delay hash, the group's dead-letter stream, the <topic>.dlq lane
-- stream, the <topic>.dlq meta hash.
-- ARGV: group, token, id, maxlen, slack, partition count, then the letter's field/value
-- pairs count n, pairs..., then the dlq record: id, key, headers, body.
-- Writes the letter, then acks, in one step. Returns 1, 0 when the entry is no longer
-- pending (settled already: a repeated call), -1 when fenced.
local group, token, id = ARGV[1], ARGV[2], ARGV[3]
if not holds(KEYS[2], token) then return -1 end
if #redis.call('XPENDING', KEYS[1], group, id, id, 1) == 0 then return 0 end
local n = tonumber(ARGV[7])
redis.call('XADD', KEYS[4], '*', unpack(ARGV, 8, 7 + 2 * n))
local r = 8 + 2 * n
if ARGV[r + 2] == '' then
  redis.call('XADD', KEYS[5], '*', 'i', ARGV[r], 'k', ARGV[r + 1], 'b', ARGV[r + 3])
else
  redis.call('XADD', KEYS[5], '*', 'i', ARGV[r], 'k', ARGV[r + 1], 'h', ARGV[r + 2], 'b', ARGV[r + 3])
end
redis.call('HSETNX', KEYS[6], 'partitions', ARGV[6])
trim(KEYS[5], tonumber(ARGV[4]), tonumber(ARGV[5]))
notify(string.sub(KEYS[6], 1, #KEYS[6] - 5), string.match(KEYS[5], ':(%d+)$'))
redis.call('XACK', KEYS[1], group, id)
redis.call('HDEL', KEYS[3], id)
return 1
"""

PENDING = _PRELUDE + r"""
-- KEYS: the lane streams; ARGV[1] group. Returns per lane the unsettled entries: lag (not
-- yet delivered) + pending (delivered, unacked); every entry when the group does not exist
-- on a lane yet.
local counts = {}
for i, key in ipairs(KEYS) do
  local n = 0
  if redis.call('EXISTS', key) == 1 then
    local found = false
    for _, raw in ipairs(redis.call('XINFO', 'GROUPS', key)) do
      local g = fields(raw)
      if g['name'] == ARGV[1] then
        found = true
        local lag = g['lag']
        if not lag then
          -- Unknown after deletions: count the entries after the last delivered one.
          lag = #redis.call('XRANGE', key, '(' .. g['last-delivered-id'], '+')
        end
        n = g['pending'] + lag
      end
    end
    if not found then n = redis.call('XLEN', key) end
  end
  counts[i] = n
end
return counts
"""

PEEK = _PRELUDE + r"""
-- KEYS: the lane streams; ARGV: group, limit. Returns per lane the packed unsettled entries,
-- oldest first (pending ones, then those not yet delivered), without delivering anything;
-- the count is the deliveries so far.
local group, left = ARGV[1], tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local packed = {}
  if left > 0 and redis.call('EXISTS', key) == 1 then
    local after = '-'
    for _, raw in ipairs(redis.call('XINFO', 'GROUPS', key)) do
      local g = fields(raw)
      if g['name'] == group then
        after = '(' .. g['last-delivered-id']
        for _, p in ipairs(redis.call('XPENDING', key, group, '-', '+', left)) do
          local entry = redis.call('XRANGE', key, p[1], p[1])
          if #entry > 0 and left > 0 then
            pack(packed, p[1], entry[1][2], p[4], '')
            left = left - 1
          end
        end
      end
    end
    if left > 0 then
      for _, e in ipairs(redis.call('XRANGE', key, after, '+', 'COUNT', left)) do
        pack(packed, e[1], e[2], 0, '')
        left = left - 1
      end
    end
  end
  out[i] = table.concat(packed)
end
return out
"""

UNREAD = _PRELUDE + r"""
-- KEYS: stream, lease. ARGV: group, token, "<entry id>=<delivery count as read>" separated by
-- spaces. These entries were read ahead and never handed to a handler: take that read back
-- from the delivery count, only where it is still the count read (so a repeated call does not
-- take it twice).
if not holds(KEYS[2], ARGV[2]) then return -1 end
local done = 0
for id, seen in string.gmatch(ARGV[3], '(%S+)=(%d+)') do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #p > 0 and p[1][4] == tonumber(seen) and p[1][4] > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], p[1][2], 0, id, 'RETRYCOUNT', p[1][4] - 1, 'JUSTID')
    done = done + 1
  end
end
return done
"""

HEARTBEAT = r"""
-- KEYS[1] the group's member set (score: expiry, server clock ms), KEYS[2] when each live
-- member joined (hash: member -> server clock ms; read by DESCRIBE). ARGV: member, ttl ms.
-- Returns the live members.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
local gone = redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE')
if #gone > 0 then redis.call('HDEL', KEYS[2], unpack(gone)) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('HSETNX', KEYS[2], ARGV[1], now)
redis.call('PEXPIRE', KEYS[1], 2 * ttl + 1000)
redis.call('PEXPIRE', KEYS[2], 2 * ttl + 1000)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

DESCRIBE = r"""
-- The group's state for Transport.describe, read-only. KEYS: the member set, the join hash,
-- then the n leases, then the n streams. ARGV: group, n. Returns {server clock ms, the live
-- members and their join times ("" unknown) as a flat list, each lease's member ("" none),
-- each stream's appended count for the group (entries read + lag; 0 for no stream, -1 unknown)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[2])
local live = redis.call('ZRANGE', KEYS[1], '(' .. now, '+inf', 'BYSCORE')
local members = {}
if #live > 0 then
  local joined = redis.call('HMGET', KEYS[2], unpack(live))
  for i, m in ipairs(live) do
    members[#members + 1] = m
    members[#members + 1] = joined[i] or ''
  end
end
local owners, published = {}, {}
for i = 1, n do
  local lease = redis.call('GET', KEYS[2 + i])
  owners[i] = lease and string.match(lease, '^(.*)/[^/]*$') or ''
  published[i] = 0
  if redis.call('EXISTS', KEYS[2 + n + i]) == 1 then
    published[i] = -1
    for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2 + n + i])) do
      local fields = {}
      for j = 1, #info, 2 do fields[info[j]] = info[j + 1] end
      local read = fields['entries-read']
      if type(read) ~= 'number' and fields['last-delivered-id'] == '0-0' then read = 0 end
      if fields['name'] == ARGV[1] and type(read) == 'number' and type(fields['lag']) == 'number' then
        published[i] = read + fields['lag']
      end
    end
  end
end
return {now, members, owners, published}
"""

ACQUIRE = r"""
-- KEYS[1] lease. ARGV: member, fresh token, ttl ms. The lease value "<member>/<token>" is
-- the fencing token; a member may take over its own lease. Returns it, or nil when held.
local current = redis.call('GET', KEYS[1])
local mine = ARGV[1] .. '/'
if current and string.sub(current, 1, #mine) ~= mine then return false end
local value = mine .. ARGV[2]
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return value
"""

ACQUIRE_MANY = r"""
-- ACQUIRE for several leases. KEYS: leases; ARGV: member, ttl ms, then a fresh token per key.
-- Returns the value of each lease taken, false where another member holds it.
local mine = ARGV[1] .. '/'
local out = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  if current and string.sub(current, 1, #mine) ~= mine then
    out[i] = false
  else
    out[i] = mine .. ARGV[i + 2]
    redis.call('SET', key, out[i], 'PX', ARGV[2])
  end
end
return out
"""

RENEW = r"""
-- KEYS: the topic's meta hash (routes the call). ARGV: ttl ms, the topic's key base, group,
-- the leases as "<partition> <token>;...". Returns the partitions no longer held (not renewed):
-- usually none, where a list of the renewed ones was a thousand integers a second to parse.
local ttl, base, group = ARGV[1], ARGV[2], ARGV[3]
local lost = {}
for partition, token in string.gmatch(ARGV[4], '(%d+) ([^;]+)') do
  local key = base .. ':lease:' .. group .. ':' .. partition
  if redis.call('GET', key) == token then
    redis.call('PEXPIRE', key, ttl)
  else
    lost[#lost + 1] = tonumber(partition)
  end
end
return lost
"""

RELEASE = r"""
-- KEYS[1] lease; ARGV[1] token. Compare and delete.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# -- scheduled messages (semantics rule 14; docs/providers/redis.md, "Scheduled messages") -----
# <base>:sched is a sorted set (message id, score = due time in ms on the epoch), <base>:sched:rec
# a hash (message id -> the record packed as PUBLISH takes it), <base>:sched:mover the mover's
# lease (<holder>, PX). Every call is one script, so a record is appended exactly when it leaves
# the set, and a cancel either finds it waiting or finds it moved.

SCHEDULE = r"""
-- KEYS[1] the topic's meta hash (routes the call); ARGV: key base, due ms, message id, the record
-- packed as for PUBLISH. A message id waiting already is replaced. Returns 1.
local base = ARGV[1]
redis.call('ZADD', base .. ':sched', ARGV[2], ARGV[3])
redis.call('HSET', base .. ':sched:rec', ARGV[3], ARGV[4])
return 1
"""

CANCEL_SCHEDULED = r"""
-- KEYS[1] meta (routing); ARGV: key base, message id. Returns 1 when it was waiting (now gone).
local base = ARGV[1]
local removed = redis.call('ZREM', base .. ':sched', ARGV[2])
if removed == 1 then redis.call('HDEL', base .. ':sched:rec', ARGV[2]) end
return removed
"""

MOVE_DUE = _PRELUDE + r"""
-- KEYS[1] meta (routing); ARGV: key base, maxlen, slack, the most records to move, holder, lease
-- ms. Only the holder of <base>:sched:mover moves (taken when free, extended by each call): the
-- others answer {-1, -1} and look again later. Due = score <= the server's clock. Each due record
-- is appended to its lane as PUBLISH appends it and leaves the set and the hash in the same run.
-- Returns {records moved, ms until the next one is due (-1: none waits)}.
local base = ARGV[1]
local maxlen, slack, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease = base .. ':sched:mover'
local current = redis.call('GET', lease)
if current and current ~= ARGV[5] then return {-1, -1} end
redis.call('SET', lease, ARGV[5], 'PX', ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local zkey, hkey = base .. ':sched', base .. ':sched:rec'
local due = redis.call('ZRANGE', zkey, '-inf', string.format('%.0f', now), 'BYSCORE', 'LIMIT', 0, limit)
local touched = {}
for _, mid in ipairs(due) do
  local data = redis.call('HGET', hkey, mid)
  if data then
    local pos = 5
    local partition = struct.unpack('>I4', data, 1)
    local parts = {}
    for i = 1, 4 do
      local n = struct.unpack('>I4', data, pos)
      parts[i] = string.sub(data, pos + 4, pos + 3 + n)
      pos = pos + 4 + n
    end
    local stream = base .. ':' .. partition
    if parts[3] == '' then
      redis.call('XADD', stream, '*', 'i', parts[1], 'k', parts[2], 'b', parts[4])
    else
      redis.call('XADD', stream, '*', 'i', parts[1], 'k', parts[2], 'h', parts[3], 'b', parts[4])
    end
    touched[stream] = partition
  end
  redis.call('ZREM', zkey, mid)
  redis.call('HDEL', hkey, mid)
end
local lanes = {}
for stream, partition in pairs(touched) do
  trim(stream, maxlen, slack)
  lanes[#lanes + 1] = partition
end
if #lanes > 0 then notify(base, table.concat(lanes, ',')) end
local nxt = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
local wait = -1
if #nxt > 0 then wait = math.max(0, tonumber(nxt[2]) - now) end
return {#due, wait}
"""
