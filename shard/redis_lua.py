"""What garin keeps in Redis, and the Lua scripts that change it atomically.

Keys (one garin deployment per Redis server: pub/sub channels are shared
by all of a Redis's databases, so another database number would still mix
two deployments' rooms):

- `garin:roster:<room>`: hash, member id (`<instance>:<key>`) -> username.
  Its length is the room's `totalUsers` on all hosts.
- `garin:owned:<instance>`: hash, key -> room: the members of one shard
  process, so that the others can remove them if it dies.
- `garin:alive:<instance>`: present while the shard process lives (a
  heartbeat sets it every second with an expiry of GARIN_REDIS_DEAD_AFTER).
- `garin:instances`: set of the instances that have members or heartbeats.
- `garin:reaped:<instance>`: a tombstone (an hour) for an instance the others
  took for dead, so that it learns it (after a long pause) and does not
  silently come back with members the others saw leave.
- `garin:reaping`: present for REAP_EVERY_MS after a reaping run.
- `garin:epoch`: a random value set by the first instance to register with
  this Redis: an instance that comes back to the same epoch and finds
  itself neither alive nor known was reaped (even once its tombstone has
  expired), while a new epoch means Redis restarted empty and nobody saw
  anyone leave.

Channels: `garin:room:<room>` (events, garin/shard/cluster_rooms.py).

A join or leave counts the member and publishes its announcement, with the
new count, in one script: Redis runs a script alone, so the counts that
members see on one channel only ever change by one, in the channel's order.

The scripts build key names themselves (a member's room, a dead instance's
rooms): fine on one Redis server or a primary with replicas; Redis Cluster
would need the room's keys and channel in one hash slot (README).
"""

from __future__ import annotations

INSTANCES = "garin:instances"
# A little under the heartbeat's second, so that some shard process reaps
# about every second.
REAP_EVERY_MS = 900


def roster(room: str) -> str:
    return "garin:roster:" + room


def owned(instance: str) -> str:
    return "garin:owned:" + instance


def alive(instance: str) -> str:
    return "garin:alive:" + instance


# KEYS: roster, owned. ARGV: channel, instance, key, room, username.
# Refused (-1) for an instance that is not alive: reaped, its join would be
# a ghost nobody removes (the instance goes on under a new name).
JOIN = """
if redis.call('EXISTS', 'garin:alive:' .. ARGV[2]) == 0 then return -1 end
local id = ARGV[2] .. ':' .. ARGV[3]
redis.call('HSET', KEYS[1], id, ARGV[5])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
local total = redis.call('HLEN', KEYS[1])
redis.call('PUBLISH', ARGV[1], 'j ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. total .. ' ' .. ARGV[5])
return total
"""

# KEYS: roster, owned. ARGV: channel, instance, key, username.
# Only a member Redis has is removed and announced.
LEAVE = """
local id = ARGV[2] .. ':' .. ARGV[3]
redis.call('HDEL', KEYS[2], ARGV[3])
if redis.call('HDEL', KEYS[1], id) == 0 then return -1 end
local total = redis.call('HLEN', KEYS[1])
redis.call('PUBLISH', ARGV[1], 'l ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. total .. ' ' .. ARGV[4])
return total
"""

# Remove one instance's members, announcing each leave. Used by REAP and
# REGISTER; `keep` (key -> true) spares members still there.
_REMOVE = """
local function remove(inst, keep)
  local owned = 'garin:owned:' .. inst
  local fields = redis.call('HGETALL', owned)
  for i = 1, #fields, 2 do
    local key, room = fields[i], fields[i + 1]
    if not keep[key] then
      local roster = 'garin:roster:' .. room
      local id = inst .. ':' .. key
      local name = redis.call('HGET', roster, id)
      if name then
        redis.call('HDEL', roster, id)
        local total = redis.call('HLEN', roster)
        redis.call('PUBLISH', 'garin:room:' .. room, 'l ' .. inst .. ' ' .. key .. ' ' .. total .. ' ' .. name)
      end
      redis.call('HDEL', owned, key)
    end
  end
end
"""

# Heartbeat. ARGV: instance, dead_after_ms. Returns 0 if the others took this
# instance for dead (its tombstone is there, or it is neither alive nor
# known: reaped longer ago than a tombstone lasts, or the keys were
# flushed), else 1.
HEARTBEAT = """
if redis.call('EXISTS', 'garin:reaped:' .. ARGV[1]) == 1 then return 0 end
if redis.call('EXISTS', 'garin:alive:' .. ARGV[1]) == 0
    and redis.call('SISMEMBER', 'garin:instances', ARGV[1]) == 0 then return 0 end
redis.call('SET', 'garin:alive:' .. ARGV[1], '1', 'PX', ARGV[2])
redis.call('SADD', 'garin:instances', ARGV[1])
return 1
"""

# Remove the members of every instance whose heartbeat expired, announcing
# each as a userleave. Returns the number of instances reaped. Every shard
# process calls it every second, but it runs at most once per REAP_EVERY_MS
# (`garin:reaping`): its cost grows with the number of instances, so one
# run per second in all, not one per instance.
REAP = _REMOVE + """
if not redis.call('SET', 'garin:reaping', '1', 'NX', 'PX', ARGV[1]) then return 0 end
local reaped = 0
for _, inst in ipairs(redis.call('SMEMBERS', 'garin:instances')) do
  if redis.call('EXISTS', 'garin:alive:' .. inst) == 0 then
    remove(inst, {})
    redis.call('DEL', 'garin:owned:' .. inst)
    redis.call('SREM', 'garin:instances', inst)
    redis.call('SET', 'garin:reaped:' .. inst, '1', 'EX', 3600)
    reaped = reaped + 1
  end
end
return reaped
"""

# After a (re)connection: this instance's members are exactly those given
# (key, room, username triples after ARGV[1..4] = instance, dead_after_ms,
# the epoch it last registered in ("" the first time), a fresh epoch in
# case Redis has none). Missing ones are added silently (Redis restarted
# empty: nobody saw them leave), ones Redis has but the instance does not
# are removed and announced (their leave was lost with the connection).
# Returns 0 if the others took this instance for dead, else the epoch.
REGISTER = _REMOVE + """
local inst = ARGV[1]
if redis.call('EXISTS', 'garin:reaped:' .. inst) == 1 then return 0 end
local epoch = redis.call('GET', 'garin:epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('SET', 'garin:epoch', epoch)
elseif epoch == ARGV[3] and redis.call('EXISTS', 'garin:alive:' .. inst) == 0
    and redis.call('SISMEMBER', 'garin:instances', inst) == 0 then
  return 0
end
redis.call('SET', 'garin:alive:' .. inst, '1', 'PX', ARGV[2])
redis.call('SADD', 'garin:instances', inst)
local keep = {}
for i = 5, #ARGV, 3 do
  keep[ARGV[i]] = true
end
remove(inst, keep)
for i = 5, #ARGV, 3 do
  redis.call('HSET', 'garin:roster:' .. ARGV[i + 1], inst .. ':' .. ARGV[i], ARGV[i + 2])
  redis.call('HSET', 'garin:owned:' .. inst, ARGV[i], ARGV[i + 1])
end
return epoch
"""

# A stopping instance: its members have left; forget it.
FAREWELL = _REMOVE + """
remove(ARGV[1], {})
redis.call('DEL', 'garin:alive:' .. ARGV[1], 'garin:owned:' .. ARGV[1])
redis.call('SREM', 'garin:instances', ARGV[1])
return 1
"""
