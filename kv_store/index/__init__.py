"""The block index: which store nodes hold which KV blocks (see ``base`` for the contracts).

``EmbeddedBlockIndex`` lives in one process; ``RedisBlockIndex`` is shared by a cluster.
The latter needs the ``redis`` package, so it is imported on first use: importing this
package never does.
"""

from kvmesh.kv_store.index.base import (
    MAX_GROUP_KEYS,
    MAX_GROUPS,
    TIERS,
    BlockIndex,
    IndexEvent,
    NodeInfo,
    Subscription,
)
from kvmesh.kv_store.index.embedded import EmbeddedBlockIndex

__all__ = [
    "MAX_GROUP_KEYS",
    "MAX_GROUPS",
    "TIERS",
    "BlockIndex",
    "EmbeddedBlockIndex",
    "IndexEvent",
    "NodeInfo",
    "RedisBlockIndex",
    "Subscription",
]


def __getattr__(name: str):
    if name == "RedisBlockIndex":
        from kvmesh.kv_store.index.redis_index import RedisBlockIndex

        return RedisBlockIndex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
