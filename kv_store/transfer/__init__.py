"""Transfer backends: move KV block bytes out of a store's host arena into another process.

A store exposes its arena through one or more ``SourceRegion`` s and hands their
descriptors to readers; a reader opens the descriptor of the backend both sides prefer:

    offers = {"shm": shm_source.descriptor(), "grpc": grpc_source.descriptor()}   # store
    choice = choose_backend(usable_backends(offers), set(offers))                 # worker
    reader = open_reader(offers[choice.backend], secret=cluster_secret)
    reader.read([Extent(offset, size), ...], dest, deadline_s=0.5, lease=lease_id)

Backends: ``shm`` (same host, the arena in named shared memory, plain memory copies),
``nixl`` (NIXL/UCX one-sided reads; ``pip install nixl``) and ``grpc`` (a streaming gRPC
service; works everywhere). Backend modules are imported on first use, so this package
imports without NIXL or a gRPC server.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, NamedTuple

from kvmesh.kv_store.transfer.base import (
    Extent, Reader, ReaderBroken, SourceRegion, TransferError, decode_descriptor,
)

BACKENDS = ("shm", "nixl", "grpc")
DEFAULT_PREFERENCE = ("shm", "nixl", "grpc")

__all__ = [
    "BACKENDS", "BackendChoice", "Extent", "Reader", "ReaderBroken", "SourceRegion", "TransferError",
    "available_backends", "choose_backend", "open_reader", "open_source", "usable_backends",
]


class BackendChoice(NamedTuple):
    backend: str
    reason: str


def open_reader(descriptor: bytes, secret: str | None = None, **options) -> Reader:
    """A reader attached to the source ``descriptor`` describes (any backend); a ``grpc``
    one sends the cluster ``secret`` with every read.

    ``ValueError`` for a descriptor that is not one; ``TransferError`` if the source
    cannot be attached (segment gone, NIXL unusable here, another host's shm)."""
    fields = decode_descriptor(descriptor)
    backend = fields["backend"]
    if backend == "shm":
        from kvmesh.kv_store.transfer.shm_backend import ShmReader
        return ShmReader(fields, **options)
    if backend == "nixl":
        from kvmesh.kv_store.transfer.nixl_backend import NixlReader
        return NixlReader(fields, **options)
    if backend == "grpc":
        from kvmesh.kv_store.transfer.grpc_backend import GrpcReader
        return GrpcReader(fields, secret=secret, **options)
    raise ValueError(f"unknown transfer backend {backend!r} (known: {', '.join(BACKENDS)})")


def open_source(backend: str, region, **options) -> SourceRegion:
    """Expose ``region`` (a ``HostTier``; for ``shm`` one created with ``shm_name``;
    ``nixl`` and ``grpc`` take any buffer too) through ``backend``."""
    if backend == "shm":
        from kvmesh.kv_store.transfer.shm_backend import ShmSource
        return ShmSource(region, **options)
    if backend == "nixl":
        from kvmesh.kv_store.transfer.nixl_backend import NixlSource
        return NixlSource(region, **options)
    if backend == "grpc":
        from kvmesh.kv_store.transfer.grpc_backend import GrpcSource
        return GrpcSource(region, **options)
    raise ValueError(f"unknown transfer backend {backend!r} (known: {', '.join(BACKENDS)})")


def available_backends() -> set[str]:
    """The backends this process can use at all: ``grpc`` always, ``shm`` where POSIX
    shared memory exists, ``nixl`` where the package is installed."""
    from kvmesh.kv_store.transfer.nixl_backend import nixl_available

    found = {"grpc"}
    if os.path.isdir("/dev/shm"):
        found.add("shm")
    if nixl_available():
        found.add("nixl")
    return found


def usable_backends(offers: Mapping[str, bytes]) -> set[str]:
    """Of the backends a source offers (name → descriptor), those this process can use
    for that source: ``shm`` only on the source's host with its segment present."""
    local = available_backends()
    usable = set()
    for backend, descriptor in offers.items():
        if backend not in local:
            continue
        if backend == "shm":
            from kvmesh.kv_store.tiers import shm_path
            from kvmesh.kv_store.transfer.shm_backend import boot_id

            try:
                fields = decode_descriptor(descriptor)
                st = os.stat(shm_path(fields["name"]))
            except (ValueError, OSError, KeyError):
                continue
            same_file = (st.st_dev, st.st_ino) == (fields.get("dev"), fields.get("ino"))
            if fields.get("boot") != boot_id() or not same_file:
                continue
        usable.add(backend)
    return usable


def choose_backend(local: Iterable[str], remote: Iterable[str],
                   preference: Iterable[str] = DEFAULT_PREFERENCE) -> BackendChoice:
    """The first backend of ``preference`` that both sides have, with the reason.

    ``local``: what this side can use for this peer (``usable_backends``); ``remote``:
    what the peer offers. ``ValueError`` if they share none of ``preference``."""
    local, remote, preference = set(local), set(remote), tuple(preference)
    skipped = []
    for backend in preference:
        if backend in local and backend in remote:
            order = " > ".join(preference)
            why = f"{backend}: offered by the source and usable here, first in preference {order}"
            if skipped:
                why += "; " + "; ".join(skipped)
            return BackendChoice(backend, why)
        missing = [side for side, have in (("the source does not offer it", remote),
                                           ("not usable here", local)) if backend not in have]
        skipped.append(f"not {backend} ({' and '.join(missing)})")
    raise ValueError(f"no common transfer backend: usable here {sorted(local)}, offered "
                     f"{sorted(remote)}, preference {list(preference)}")
