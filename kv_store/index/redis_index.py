"""Block index in Redis, shared by every node and router of a cluster.

Follows every contract of ``kv_store.index.base``. Layout, all under ``<p>:`` where ``<p>``
is the prefix (default ``kvmesh``; it may not contain ``:``, so two clusters sharing a
Redis never overlap and ``<p>:*`` is exactly one cluster's keyspace):

* ``<p>:blk:<key bytes>``: hash ``node_id -> tier`` of the nodes holding the block.
* ``<p>:nodekeys:<node_id>``: set of the keys the node holds, so that cleanup never scans.
* ``<p>:nodes``: sorted set ``node_id -> last heartbeat`` (the heartbeating process's
  clock; an unregistered node being cleaned up scores ``-inf``).
* ``<p>:addr``: hash ``node_id -> address``.
* ``<p>:events``: the pub/sub channel. Each message is a msgpack array
  ``[kind, node_id, tier or "", [key, ...]]`` whose items are all msgpack *str* (raw
  bytes; Lua has a single string type), built inside the scripts.

Every change, and the event announcing it, is one Lua script, so the data and the event
order agree. Liveness compares stored heartbeats with the caller's ``clock`` (``now`` and
the timeout go to the scripts as strings, compared there with the same double arithmetic
as ``base.is_live``); hosts sharing an index therefore need synchronised clocks, with a
skew well under ``heartbeat_timeout_s``.

Departures from the one-script-per-call ideal, and why:

* ``add`` and ``remove`` send at most ``CHUNK_KEYS`` keys per script, each chunk atomic and
  announced by its own event, since a running script blocks the whole Redis. Up to
  ``CHUNK_KEYS`` keys take one round trip; more go as one pipeline (plus the pipeline's
  check that the script is loaded). Chunks applied before a node turned dead stay, and
  are reaped with the node.
* A dropped node's entries are reaped ``REAP_KEYS`` at a time, one script each, for the
  same reason: a node may hold millions of keys. The node stays in ``<p>:nodes`` (dead,
  hence invisible and refused by ``heartbeat`` and ``add``) until its key set is empty;
  the script that empties it removes the node and publishes ``node_expired``, so a crash
  midway leaves work for the next ``expire_dead_nodes``, never a leak, and concurrent
  reapers announce each node once.

The scripts read keys they do not declare, so the index needs a single Redis (or a
primary with replicas), not Redis Cluster. The client must not decode responses (keys are
bytes); give it socket timeouts (``from_url`` does), since waits are bounded by them.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import msgpack
import redis
from redis.commands.core import Script

from kvmesh.kv_store.index.base import (
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    BlockIndex,
    IndexEvent,
    NodeInfo,
    Subscription,
    check_groups,
    check_node_id,
    check_tier,
    check_timeout,
    unique,
)

DEFAULT_PREFIX = "kvmesh"
DEFAULT_SOCKET_TIMEOUT_S = 5.0
CHUNK_KEYS = 1024
REAP_KEYS = 4096

# Scripts. ARGV[1] is always the prefix; "live" means score >= now - timeout.

_LIVE = """
local function live(p, node, now, timeout)
  local score = redis.call('ZSCORE', p .. ':nodes', node)
  return score and tonumber(score) >= tonumber(now) - tonumber(timeout), score
end
"""

# ARGV: prefix, node, address, now, timeout. Returns 0 while a dead registration still
# has entries (the caller reaps them and retries), else registers and returns 1.
_REGISTER = _LIVE + """
local p, node = ARGV[1], ARGV[2]
local is_live, score = live(p, node, ARGV[4], ARGV[5])
if not is_live then
  if redis.call('EXISTS', p .. ':nodekeys:' .. node) == 1 then return 0 end
  if score then
    redis.call('PUBLISH', p .. ':events', cmsgpack.pack({'node_expired', node, '', {}}))
  end
end
redis.call('ZADD', p .. ':nodes', ARGV[4], node)
redis.call('HSET', p .. ':addr', node, ARGV[3])
return 1
"""

# ARGV: prefix, node, now, timeout. Returns 1, or 0 if the node is not live.
_HEARTBEAT = _LIVE + """
if not live(ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('ZADD', ARGV[1] .. ':nodes', ARGV[3], ARGV[2])
return 1
"""

# ARGV: prefix, node, now, timeout, tier, key... Returns 1, or 0 if the node is not live.
_ADD = _LIVE + """
local p, node, tier = ARGV[1], ARGV[2], ARGV[5]
if not live(p, node, ARGV[3], ARGV[4]) then return 0 end
if #ARGV < 6 then return 1 end
local blk = p .. ':blk:'
for i = 6, #ARGV do redis.call('HSET', blk .. ARGV[i], node, tier) end
redis.call('SADD', p .. ':nodekeys:' .. node, unpack(ARGV, 6))
redis.call('PUBLISH', p .. ':events', cmsgpack.pack({'stored', node, tier, {unpack(ARGV, 6)}}))
return 1
"""

# ARGV: prefix, node, key... Returns how many of the keys the node held.
_REMOVE = """
local p, node = ARGV[1], ARGV[2]
local blk, removed = p .. ':blk:', {}
for i = 3, #ARGV do
  if redis.call('HDEL', blk .. ARGV[i], node) == 1 then removed[#removed + 1] = ARGV[i] end
end
if #removed > 0 then
  redis.call('SREM', p .. ':nodekeys:' .. node, unpack(removed))
  redis.call('PUBLISH', p .. ':events', cmsgpack.pack({'removed', node, '', removed}))
end
return #removed
"""

# ARGV: prefix, node, now, timeout, limit. Drops up to limit entries of a node that is not
# live. Returns -1 if the node is live, 0 if entries remain, 1 if this call finished the
# node off (and announced it), 2 if there was no registration left to finish.
_REAP = _LIVE + """
local p, node = ARGV[1], ARGV[2]
local is_live, score = live(p, node, ARGV[3], ARGV[4])
if is_live then return -1 end
local nodekeys, blk = p .. ':nodekeys:' .. node, p .. ':blk:'
for _, key in ipairs(redis.call('SPOP', nodekeys, tonumber(ARGV[5]))) do
  redis.call('HDEL', blk .. key, node)
end
if redis.call('EXISTS', nodekeys) == 1 then return 0 end
if not score then return 2 end
redis.call('ZREM', p .. ':nodes', node)
redis.call('HDEL', p .. ':addr', node)
redis.call('PUBLISH', p .. ':events', cmsgpack.pack({'node_expired', node, '', {}}))
return 1
"""

# ARGV: prefix, now, timeout, n, size_1 .. size_n, keys of group 1, keys of group 2, ...
# Returns a flat array node_1, depth_1, node_2, depth_2, ... of the nodes with depth > 0.
_LONGEST_PREFIX = """
local p, n = ARGV[1], tonumber(ARGV[4])
local cutoff = tonumber(ARGV[2]) - tonumber(ARGV[3])
local live = {}
local nodes = redis.call('ZRANGE', p .. ':nodes', 0, -1, 'WITHSCORES')
for i = 1, #nodes, 2 do
  if tonumber(nodes[i + 1]) >= cutoff then live[nodes[i]] = true end
end
local blk, result, candidates = p .. ':blk:', {}, nil
local pos = 5 + n
for g = 1, n do
  local size = tonumber(ARGV[4 + g])
  for i = pos, pos + size - 1 do
    local key = blk .. ARGV[i]
    if candidates == nil then
      candidates = {}
      for _, node in ipairs(redis.call('HKEYS', key)) do
        if live[node] then candidates[node] = true end
      end
    else
      for node in pairs(candidates) do
        if redis.call('HEXISTS', key, node) == 0 then
          candidates[node] = nil
          if g > 1 then
            result[#result + 1] = node
            result[#result + 1] = g - 1
          end
        end
      end
    end
    if next(candidates) == nil then return result end
  end
  pos = pos + size
end
for node in pairs(candidates or {}) do
  result[#result + 1] = node
  result[#result + 1] = n
end
return result
"""


class RedisSubscription(Subscription):
    """One pub/sub connection on ``<p>:events``; opened confirmed, so no later event is missed."""

    def __init__(
        self, index: "RedisBlockIndex", client: redis.Redis, channel: str, timeout_s: float
    ):
        self._index = index
        self._pubsub = client.pubsub()
        self._closed = False
        try:
            self._pubsub.subscribe(channel)
            deadline = time.monotonic() + timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no confirmation of the subscription to {channel}")
                message = self._pubsub.get_message(timeout=left)
                if message is not None and message["type"] == "subscribe":
                    break
        except BaseException:
            self._pubsub.close()
            raise

    def get(self, timeout_s: float) -> IndexEvent | None:
        if self._closed:
            raise ValueError("subscription is closed")
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            message = self._pubsub.get_message(timeout=max(deadline - time.monotonic(), 0.0))
            if message is not None and message["type"] == "message":
                return _decode_event(message["data"])
            if time.monotonic() >= deadline:
                return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pubsub.close()
            self._index.forget(self)


def _decode_event(payload: bytes) -> IndexEvent:
    kind, node_id, tier, keys = msgpack.unpackb(payload, raw=True)
    return IndexEvent(kind.decode(), node_id.decode(), tier.decode() or None, tuple(keys))


class RedisBlockIndex(BlockIndex):
    """Block index over ``client``, which the caller keeps owning (see ``from_url``)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = DEFAULT_PREFIX,
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        subscribe_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    ):
        if not prefix or ":" in prefix:
            raise ValueError("prefix must be non-empty and contain no ':'")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the Redis client must not decode responses")
        self.heartbeat_timeout_s = check_timeout(heartbeat_timeout_s)
        self.prefix = prefix
        self._client = client
        self._owns_client = False
        self._clock = clock
        self._subscribe_timeout_s = subscribe_timeout_s
        self._subscriptions_lock = threading.Lock()
        self._subscriptions: set[RedisSubscription] = set()
        self._register = client.register_script(_REGISTER)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._add = client.register_script(_ADD)
        self._remove = client.register_script(_REMOVE)
        self._reap = client.register_script(_REAP)
        self._longest_prefix = client.register_script(_LONGEST_PREFIX)

    @classmethod
    def from_url(
        cls, url: str, socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S, **kwargs
    ) -> "RedisBlockIndex":
        """An index over a client of its own for ``url`` (closed by ``close``)."""
        client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        index = cls(client, **kwargs)
        index._owns_client = True
        return index

    def _times(self) -> tuple[float, str, str]:
        """The liveness cutoff, and ``now`` and the timeout as the scripts take them."""
        now = float(self._clock())
        return now - self.heartbeat_timeout_s, repr(now), repr(self.heartbeat_timeout_s)

    def _reap_all(self, node_id: str, now: str, timeout: str) -> bool:
        """Drop what a dead registration left; True if this call announced its end."""
        while True:
            status = self._reap(args=[self.prefix, node_id, now, timeout, REAP_KEYS])
            if status != 0:
                return status == 1

    def _in_chunks(self, script: Script, head: list, keys: list[bytes]) -> list:
        """Run ``script`` over ``keys`` in chunks: one call, or one pipelined round trip
        (plus the pipeline's check that the script is loaded)."""
        if len(keys) <= CHUNK_KEYS:
            return [script(args=[*head, *keys])]
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(keys), CHUNK_KEYS):
            script(args=[*head, *keys[start:start + CHUNK_KEYS]], client=pipe)
        return pipe.execute()

    def register_node(self, node_id: str, address: str) -> None:
        check_node_id(node_id)
        _, now, timeout = self._times()
        while not self._register(args=[self.prefix, node_id, address, now, timeout]):
            self._reap_all(node_id, now, timeout)

    def heartbeat(self, node_id: str) -> None:
        _, now, timeout = self._times()
        if not self._heartbeat(args=[self.prefix, node_id, now, timeout]):
            raise KeyError(node_id)

    def unregister_node(self, node_id: str) -> None:
        self._client.zadd(f"{self.prefix}:nodes", {node_id: float("-inf")}, xx=True)
        _, now, timeout = self._times()
        self._reap_all(node_id, now, timeout)

    def live_nodes(self) -> dict[str, NodeInfo]:
        cutoff, _, _ = self._times()
        pipe = self._client.pipeline(transaction=True)
        pipe.zrangebyscore(f"{self.prefix}:nodes", repr(cutoff), "+inf", withscores=True)
        pipe.hgetall(f"{self.prefix}:addr")
        scored, addresses = pipe.execute()
        return {
            node.decode(): NodeInfo(node.decode(), addresses.get(node, b"").decode(), score)
            for node, score in scored
        }

    def add(self, node_id: str, tier: str, keys: Sequence[bytes]) -> None:
        check_tier(tier)
        _, now, timeout = self._times()
        head = [self.prefix, node_id, now, timeout, tier]
        if not all(self._in_chunks(self._add, head, unique(keys))):
            raise KeyError(node_id)

    def remove(self, node_id: str, keys: Sequence[bytes]) -> None:
        keys = unique(keys)
        if keys:
            self._in_chunks(self._remove, [self.prefix, node_id], keys)

    def longest_prefix(self, groups: Sequence[Sequence[bytes]]) -> dict[str, int]:
        """One script call, so one round trip once Redis has cached the script (the first
        call after Redis starts loads it). It stops at the first group no candidate holds
        in full."""
        check_groups(groups)
        if not groups:
            return {}
        _, now, timeout = self._times()
        args: list = [self.prefix, now, timeout, len(groups)]
        args.extend(len(group) for group in groups)
        for group in groups:
            args.extend(group)
        flat = self._longest_prefix(args=args)
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def locate(self, keys: Sequence[bytes]) -> dict[bytes, dict[str, str]]:
        keys = unique(keys)
        cutoff, _, _ = self._times()
        pipe = self._client.pipeline(transaction=True)
        pipe.zrangebyscore(f"{self.prefix}:nodes", repr(cutoff), "+inf")
        blk = f"{self.prefix}:blk:".encode()
        for key in keys:
            pipe.hgetall(blk + key)
        live, *holders = pipe.execute()
        live = set(live)
        out: dict[bytes, dict[str, str]] = {}
        for key, found in zip(keys, holders):
            here = {n.decode(): t.decode() for n, t in found.items() if n in live}
            if here:
                out[key] = here
        return out

    def subscribe(self) -> RedisSubscription:
        """A subscription on a connection of its own; ``TimeoutError`` if Redis does not
        confirm it within ``subscribe_timeout_s``. If its connection breaks, ``get``
        reconnects and resubscribes (events published meanwhile are lost), taking up to the
        client's connect timeout and retries on top of its own, or raises
        ``redis.ConnectionError`` when Redis cannot be reached."""
        channel = f"{self.prefix}:events"
        sub = RedisSubscription(self, self._client, channel, self._subscribe_timeout_s)
        with self._subscriptions_lock:
            self._subscriptions.add(sub)
        return sub

    def forget(self, sub: RedisSubscription) -> None:
        """Stop tracking ``sub``; called by its ``close``."""
        with self._subscriptions_lock:
            self._subscriptions.discard(sub)

    def expire_dead_nodes(self) -> list[str]:
        cutoff, now, timeout = self._times()
        dead = self._client.zrangebyscore(f"{self.prefix}:nodes", "-inf", f"({cutoff!r}")
        return [n.decode() for n in dead if self._reap_all(n.decode(), now, timeout)]

    def close(self) -> None:
        with self._subscriptions_lock:
            subs = list(self._subscriptions)
        for sub in subs:
            sub.close()
        if self._owns_client:
            self._client.close()
