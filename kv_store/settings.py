"""``StoreSettings``: everything a store node is started with (``kvmesh store``, a store
in ``kvmesh serve``, a Ray store actor, a Helm store pod), defined once.

``kvmesh.kv_store.node.StoreNode.start`` turns them into a running node."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from kvmesh.kv_store.encoding import ENCODINGS, LOSSY
from kvmesh.kv_store.eviction import POLICIES
from kvmesh.kv_store.settings_base import (
    DEFAULT_HOST, Address, BytesOrZero, Names, Port, PortOrZero, PowerOfTwoBytes, Seconds,
    Settings, cluster_secret_file_field, one_of,
)
from kvmesh.kv_store.transfer import BACKENDS

Policy = Literal[tuple(POLICIES)]
TierEncoding = Literal[tuple(ENCODINGS)]


def encoding_field(tier: str):
    """The setting of how ``tier`` ("host" or "disk") holds blocks at rest: one text of
    the choices for every tier."""
    return Field("none", description=(
        f"how the {tier} tier holds blocks at rest (encoded as they are written or moved "
        "there, decoded as they are read back or moved out): none; zstd or lz4 (lossless, "
        "byte-shuffled bf16 compressed); int8 (LOSSY: 8 bits a value) and int4 (LOSSY: 4 bits "
        "a value), keys per channel and values per token with a scale and zero point per "
        "group, 0.55 and 0.3 of the bytes; "
        f"lossy ones ({', '.join(LOSSY)}) read a block back close to, not equal to, "
        "the one put, so greedy outputs may change; only when asked for"))


class StoreSettings(Settings):
    """A store node: its tiers, how it is reached, and how it finds its peers."""

    host: str = Field(DEFAULT_HOST, description=(
        "address the store binds: its gRPC API, metrics and the grpc transfer backend"))
    port: PortOrZero = Field(50051, description="gRPC port of the store API (0: any free port)")
    host_bytes: BytesOrZero = Field(2 << 30, description=(
        "host RAM tier capacity, e.g. 512MiB or 8GiB (0: no host tier)"))
    host_encoding: TierEncoding = encoding_field("host")
    disk_bytes: BytesOrZero = Field(0, description="local disk tier capacity (0: no disk tier)")
    disk_dir: Optional[str] = Field(None, description=(
        "directory of the disk tier's slab file (default: a new temporary one)"))
    direct_io: bool = Field(False, description="open the slab file with O_DIRECT")
    disk_encoding: TierEncoding = encoding_field("disk")
    disk_write_behind: BytesOrZero = Field(0, description=(
        "RAM in which disk writes are staged and written behind the put, adjacent blocks in "
        "one request (0: each write reaches the disk before the put returns)"))
    demote_ahead: float = Field(0.1, ge=0.0, lt=1.0, description=(
        "share of each faster tier kept free by moving its least recently used blocks down "
        "in the background, several in one disk request, so that puts find room (0: a put "
        "that finds no room moves one block itself)"))
    io_threads: int = Field(4, ge=1, description=(
        "block reads and moves of one request that run at once (disk, GPU)"))
    gpu_bytes: BytesOrZero = Field(0, description="GPU tier capacity (needs CUDA; 0: none)")
    policy: Policy = Field("lru", description=(
        "eviction policy of every tier: lru; s3fifo and arc (frequency-aware, scan-resistant); "
        "cost (expected reuse x cost to recompute, by prefix position)"))
    session_ttl: Seconds = Field(300.0, description=(
        "idle TTL of a session, in seconds: a session used (a request naming it) within it "
        "keeps its blocks in the fast tiers; past it, its blocks are the first to move down "
        "(host -> disk). Active or idle, a session's blocks are evicted only when nothing "
        "else can go"))
    session_priority: float = Field(1.0, ge=0.0, description=(
        "eviction priority of sessions' blocks under the cost policy (their cost to "
        "recompute is multiplied by 1 + this)"))
    max_sessions: int = Field(10000, ge=1, description=(
        "sessions kept at most; past it the least recently used one is forgotten (its "
        "blocks become ordinary blocks)"))
    page_bytes: PowerOfTwoBytes = Field(4 << 20, description=(
        "slab page size, a power of two; also the largest block"))
    metrics_port: Optional[Port] = Field(None, description=(
        "serve Prometheus metrics on this port (on --host)"))
    transfer: Annotated[Names, one_of(BACKENDS, "transfer backend")] = Field(BACKENDS, description=(
        "backends offered for zero-copy reads of the host arena, comma-separated (shm: same "
        "host; nixl: UCX/RDMA; grpc: streaming; empty: none)"))
    transfer_port: PortOrZero = Field(0, description=(
        "port of the grpc transfer backend, on --host (0: any free port); readers are told "
        "the host of --advertise, or --host unless it is a wildcard, or else this machine's "
        "first address"))
    index: Optional[str] = Field(None, description=(
        "shared block index, e.g. redis://127.0.0.1:6379/0: this node publishes its blocks "
        "there and fetches blocks it lacks from peers"), json_schema_extra={"metavar": "URL"})
    node_id: Optional[str] = Field(None, description="this node's id in the index (default: its address)")
    advertise: Optional[Address] = Field(None, description=(
        "address peers use to reach this node (default: --host:--port)"),
        json_schema_extra={"metavar": "HOST:PORT"})
    heartbeat: Seconds = Field(1.0, description="seconds between heartbeats to the index")
    heartbeat_timeout: Seconds = Field(5.0, description=(
        "seconds without a heartbeat after which a node's blocks leave lookups (more than --heartbeat)"))
    peer_timeout: Seconds = Field(2.0, description="deadline of a fetch from a peer, in seconds")
    allow_fault_injection: bool = Field(False, description="accept InjectFault calls (failure tests only)")
    cluster_secret_file: Optional[str] = cluster_secret_file_field()

    @model_validator(mode="after")
    def _check(self) -> "StoreSettings":
        if self.heartbeat_timeout <= self.heartbeat:  # a node would drop out between heartbeats
            raise ValueError(f"heartbeat_timeout ({self.heartbeat_timeout} s) must be longer than "
                             f"heartbeat ({self.heartbeat} s)")
        if not (self.host_bytes or self.disk_bytes or self.gpu_bytes):
            raise ValueError("a store needs at least one tier: host_bytes, disk_bytes or gpu_bytes")
        if self.index and self.port == 0 and not self.advertise:
            raise ValueError("with an index, give a fixed port or advertise")
        return self
