"""The block index: which store nodes hold which KV blocks, and in which tier.

A block is named by an opaque ``bytes`` key (any bytes: NUL and ``:`` included). A request
asks about a chain of **groups** of keys, one group per block position, a group being
every key that one block needs (for example one per layer). The index answers "which
node holds the longest prefix of these groups" and "who holds these keys".

Contract of every ``BlockIndex``:

* **Liveness.** A node is live while its last heartbeat (``register_node`` or
  ``heartbeat``) is at most ``heartbeat_timeout_s`` old by the caller's clock, that is
  while ``last_seen >= now - heartbeat_timeout_s``. Entries of a node that is not live
  are invisible to ``longest_prefix``, ``locate`` and ``live_nodes`` at once, before
  ``expire_dead_nodes`` has cleaned them up.
* **Registrations.** ``heartbeat`` and ``add`` refuse (``KeyError``) a node that is not
  live; such a node must ``register_node`` again and re-announce what it holds, because
  its old entries are gone or about to go. ``register_node`` of a live node refreshes its
  address and heartbeat and keeps its entries; of a node that is not live, it first drops
  whatever the old registration left (announcing ``node_expired``) and starts empty.
* **Cleanup.** ``expire_dead_nodes`` and ``unregister_node`` remove every entry of the
  nodes they drop, and announce each with one ``node_expired`` event; nothing of those
  nodes is left behind. Each dropped registration is announced once, however many
  callers race to clean it up.
* **Events.** A subscription receives the events published after ``subscribe`` returned,
  in the order the changes were made. Delivery is at most once: a subscriber that falls
  too far behind or loses its connection misses events, so events are hints and the
  queries are the truth. An ``add`` or ``remove`` of many keys may be announced as
  several events of the same kind, in order.
* **Bounds.** ``longest_prefix`` refuses (``ValueError``) more than ``MAX_GROUPS``
  groups, an empty group, or a group of more than ``MAX_GROUP_KEYS`` keys. Tiers are
  those of ``TIERS``. Every wait is bounded by a timeout.
* All methods are thread-safe, except that one ``Subscription`` serves one thread at
  a time. ``close`` closes the subscriptions opened on the index.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, NamedTuple, Sequence

TIERS = ("gpu", "host", "disk")
MAX_GROUPS = 4096
MAX_GROUP_KEYS = 1024
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0


class NodeInfo(NamedTuple):
    node_id: str
    address: str
    last_seen: float


class IndexEvent(NamedTuple):
    """One change to the index.

    * ``stored``: ``node_id`` now holds ``keys`` in ``tier`` (a key it held in another
      tier moved).
    * ``removed``: ``node_id`` no longer holds ``keys``; ``tier`` is None. Only keys the
      node held are listed, and an event is only sent when there is at least one.
    * ``node_expired``: ``node_id`` is gone with every entry it had; ``tier`` is None and
      ``keys`` is empty.
    """

    kind: str
    node_id: str
    tier: str | None
    keys: tuple[bytes, ...]


class Subscription(ABC):
    """Events published after the subscription was opened, in order."""

    @abstractmethod
    def get(self, timeout_s: float) -> IndexEvent | None:
        """The next event, or None when none came within ``timeout_s`` (never blocks longer).

        Raises ``ValueError`` once the subscription is closed.
        """

    @abstractmethod
    def close(self) -> None:
        """Stop receiving events and free the subscription's resources; idempotent."""

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockIndex(ABC):
    heartbeat_timeout_s: float

    @abstractmethod
    def register_node(self, node_id: str, address: str) -> None:
        """Register ``node_id`` at ``address``; counts as a heartbeat (see the module doc)."""

    @abstractmethod
    def heartbeat(self, node_id: str) -> None:
        """Mark ``node_id`` as seen now; ``KeyError`` if it is not live (never registered,
        timed out, expired or unregistered)."""

    @abstractmethod
    def unregister_node(self, node_id: str) -> None:
        """Drop ``node_id`` and all its entries and announce ``node_expired``; a no-op for
        a node that is not registered."""

    @abstractmethod
    def live_nodes(self) -> dict[str, NodeInfo]:
        """The live nodes by id."""

    @abstractmethod
    def add(self, node_id: str, tier: str, keys: Sequence[bytes]) -> None:
        """Record that live ``node_id`` holds ``keys`` in ``tier`` (moving keys it held in
        another tier) and announce ``stored``. ``KeyError`` if the node is not live,
        ``ValueError`` for a tier not in ``TIERS``."""

    @abstractmethod
    def remove(self, node_id: str, keys: Sequence[bytes]) -> None:
        """Record that ``node_id`` no longer holds ``keys``; announce ``removed`` for
        those it held."""

    @abstractmethod
    def longest_prefix(self, groups: Sequence[Sequence[bytes]]) -> dict[str, int]:
        """For every live node, how many leading groups it holds every key of; nodes
        with none are omitted. The answer is a hint: blocks may go right after it."""

    @abstractmethod
    def locate(self, keys: Sequence[bytes]) -> dict[bytes, dict[str, str]]:
        """``key -> {node_id: tier}`` over live nodes; keys no live node holds are omitted."""

    @abstractmethod
    def subscribe(self) -> Subscription:
        """A subscription to the events published from now on."""

    @abstractmethod
    def expire_dead_nodes(self) -> list[str]:
        """Drop every registered node that is not live, with all its entries; announce
        ``node_expired`` for each and return the ids this call dropped."""

    @abstractmethod
    def close(self) -> None:
        """Close the subscriptions opened on this index and free its resources."""

    def __enter__(self) -> "BlockIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_live(last_seen: float, now: float, timeout_s: float) -> bool:
    """The liveness rule, spelled once so that every implementation rounds alike."""
    return last_seen >= now - timeout_s


def check_timeout(timeout_s: float) -> float:
    if not timeout_s > 0:
        raise ValueError("heartbeat_timeout_s must be positive")
    return float(timeout_s)


def check_node_id(node_id: str) -> None:
    if not isinstance(node_id, str) or not node_id:
        raise ValueError("node_id must be a non-empty string")


def check_tier(tier: str) -> None:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")


def check_groups(groups: Sequence[Sequence[bytes]]) -> None:
    if len(groups) > MAX_GROUPS:
        raise ValueError(f"{len(groups)} groups; at most {MAX_GROUPS} per call")
    for group in groups:
        if not 1 <= len(group) <= MAX_GROUP_KEYS:
            raise ValueError(f"a group has {len(group)} keys; 1 to {MAX_GROUP_KEYS} allowed")


def unique(keys: Iterable[bytes]) -> list[bytes]:
    """``keys`` without repeats, first occurrence first."""
    return list(dict.fromkeys(keys))
