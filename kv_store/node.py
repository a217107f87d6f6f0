"""A store node assembled from its ``StoreSettings``: the one place that builds one.

``StoreNode.start(settings)`` reads the cluster secret (``kvmesh.kv_store.auth``; a
warning when there is none), connects to the block index (if any), builds the tiered
store, opens the transfer sources (zero-copy reads of the host arena), serves the gRPC
API, registers with the index and serves metrics — the same for ``kvmesh store``, a
store in ``kvmesh serve`` and a Ray store actor. If any step fails, everything already
started is undone in reverse order before the error propagates (``StoreStartError``, a
one-line reason), so a failed start leaves no /dev/shm segment or thread behind.
``close()`` undoes a started node the same way; it is safe to call twice.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import socket

from kvmesh.kv_store.auth import NO_SECRET_WARNING, load_secret
from kvmesh.kv_store.settings import StoreSettings
from kvmesh_proto.options import WILDCARD_HOSTS, host_port, split_host_port

SHM_PREFIX = "kvmesh-"  # the store's host arena in /dev/shm: kvmesh-<pid>-<random>

log = logging.getLogger("kvmesh.store")


class StoreStartError(RuntimeError):
    """The node could not start; the message says why, in one line."""


class StoreNode:
    """A running store node: ``store``, ``address`` (where peers reach it), ``port`` (bound)."""

    def __init__(self, settings: StoreSettings):
        self.settings = settings
        self.store = self.server = self.publisher = None
        self.port = settings.port
        self.address = ""
        self._undo = contextlib.ExitStack()

    @classmethod
    def start(cls, settings: StoreSettings, say=lambda message: None) -> "StoreNode":
        node = cls(settings)
        try:
            node._start(say)
        except BaseException:
            node.close()
            raise
        return node

    def _start(self, say) -> None:
        from kvmesh.kv_store.gc_tuning import freeze_startup_objects
        from kvmesh.kv_store.server import start_store_server
        from kvmesh.kv_store.sessions import Sessions
        from kvmesh.kv_store.tiered_store import build_store

        s, undo = self.settings, self._undo
        try:
            secret = load_secret(s.cluster_secret_file)
        except ValueError as e:
            raise StoreStartError(str(e)) from None
        if secret is None:
            log.warning(NO_SECRET_WARNING.format(what="store"))
        peers = None
        if s.index:
            from kvmesh.kv_store.index import RedisBlockIndex
            from kvmesh.kv_store.store_node import IndexPublisher, PeerBlocks

            address = s.advertise or host_port(s.host, s.port)
            try:
                index = RedisBlockIndex.from_url(s.index, heartbeat_timeout_s=s.heartbeat_timeout)
                undo.callback(index.close)
                self.publisher = IndexPublisher(index, s.node_id or address, address, heartbeat_s=s.heartbeat)
                peers = PeerBlocks(index, s.node_id or address, timeout_s=s.peer_timeout,
                                   max_block_bytes=s.page_bytes, secret=secret)
                undo.callback(peers.close)
            except Exception as e:
                raise StoreStartError(f"cannot use the block index at {s.index}: {e}") from None

        if "shm" in s.transfer:
            from kvmesh.kv_store.tiers import reap_orphaned_segments

            for name in reap_orphaned_segments(SHM_PREFIX):
                say(f"removed {name}, the shared memory of a store that died")
        try:
            self.store = build_store(
                s.host_bytes, s.disk_bytes, s.disk_dir, s.gpu_bytes, s.policy, s.direct_io, s.page_bytes,
                listener=self.publisher.on_change if self.publisher else None,
                shm_name=f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}" if "shm" in s.transfer else None,
                io_threads=s.io_threads, disk_write_behind_bytes=s.disk_write_behind,
                demote_ahead=s.demote_ahead, disk_encoding=s.disk_encoding, host_encoding=s.host_encoding,
                sessions=Sessions(s.session_ttl, s.max_sessions, s.session_priority))
            undo.callback(self.store.close)
            sources = open_transfer_sources(
                self.store, list(s.transfer), s.host, s.transfer_port,
                advertised_host(s.advertise, s.host) if "grpc" in s.transfer else None, say,
                secret=secret)
        except (ValueError, RuntimeError, OSError) as e:
            raise StoreStartError(str(e)) from None
        for source in sources.values():
            undo.callback(source.close)
        offers = {name: source.descriptor() for name, source in sources.items()}
        if offers:
            say(f"zero-copy reads over {', '.join(offers)}")
        try:
            self.server, self.port = start_store_server(
                s.host, s.port, self.store, peers=peers, publisher=self.publisher, offers=offers,
                allow_fault_injection=s.allow_fault_injection, secret=secret)
        except RuntimeError:
            raise StoreStartError(f"cannot serve on {host_port(s.host, s.port)}: the port is in use "
                                  "or the address is not one of this host's") from None
        server = self.server
        undo.callback(lambda: server.stop(grace=2).wait(5))
        self.address = s.advertise or host_port(s.host, self.port)
        tiers = ", ".join(f"{t.name} {t.capacity_bytes} bytes" for t in self.store.tiers)
        say(f"serving on {host_port(s.host, self.port)} ({tiers}; {s.policy} eviction)")
        if self.publisher is not None:
            try:
                self.publisher.start(self.store.holdings)
            except Exception as e:
                raise StoreStartError(f"cannot register with the block index: {e}") from None
            undo.callback(self.publisher.stop)  # runs first: peers stop asking for our blocks
            say(f"node {self.publisher.node_id} registered in the block index")
        if s.metrics_port is not None:
            from prometheus_client import CollectorRegistry, start_http_server

            from kvmesh.kv_store.store_metrics import StoreCollector

            registry = CollectorRegistry()
            registry.register(StoreCollector(self.store))
            try:
                http, thread = start_http_server(s.metrics_port, addr=s.host, registry=registry)
            except OSError as e:
                raise StoreStartError(f"cannot serve metrics on {host_port(s.host, s.metrics_port)}: "
                                      f"{e.strerror or e}") from None
            undo.callback(http.server_close)
            undo.callback(http.shutdown)
            say(f"metrics on http://{host_port(s.host, s.metrics_port)}/metrics")
        freeze_startup_objects()

    def close(self) -> None:
        """Stop serving and free everything the node holds (reverse order of start)."""
        self._undo.close()


def advertised_host(advertise: str | None, host: str) -> str:
    """The host other machines reach this one by: ``advertise``'s, else ``host`` unless it
    is a wildcard (``0.0.0.0``, ``::``), else the address this machine sends from on its
    default route (never a loopback one). ``ValueError`` when there is none: then only
    ``--advertise`` can say it."""
    if advertise:
        return split_host_port(advertise)[0]
    if host not in WILDCARD_HOSTS:
        return host
    probes = [(socket.AF_INET, "192.0.2.1")]  # documentation addresses: never answered
    if host == "::":
        probes.insert(0, (socket.AF_INET6, "2001:db8::1"))
    for family, probe in probes:
        try:  # a UDP "connect" sends nothing: it only picks the route, and with it our address
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                address = s.getsockname()[0]
        except OSError:
            continue
        if not ipaddress.ip_address(address).is_loopback:
            return address
    raise ValueError(f"cannot tell which address of this machine others reach it by (bound to "
                     f"{host!r}, no default route); give --advertise HOST:PORT")


def open_transfer_sources(store, backends: list[str], host: str, port: int = 0,
                          advertise_host: str | None = None, say=lambda message: None,
                          secret: str | None = None) -> dict:
    """Expose the store's host arena through each usable transfer backend: gRPC on
    ``host:port`` (its descriptor naming ``advertise_host``), asking every read for
    ``secret`` and a lease of ``store`` that pins what it reads; NIXL with its UCX
    listener on ``host``'s interface. If one fails to open, those already open are
    closed before the error propagates."""
    from kvmesh.kv_store.transfer import BACKENDS, available_backends, open_source

    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown transfer backend(s) {sorted(unknown)}; use {', '.join(BACKENDS)}")
    arena = next((t for t in store.tiers if t.name == "host"), None)
    if arena is None:
        return {}
    usable = available_backends()
    sources = {}
    try:
        for backend in backends:
            if backend not in usable:
                say(f"transfer backend {backend} is not usable here; skipped")
                continue
            options = {}
            if backend == "grpc":
                options = {"address": host_port(host, port), "advertise_host": advertise_host,
                           "secret": secret, "lease_check": store.lease_covers}
            elif backend == "nixl":
                options = {"host": host}
            sources[backend] = open_source(backend, arena, **options)
    except BaseException:
        for source in sources.values():
            source.close()
        raise
    return sources
