"""The portable transfer: a small gRPC service that streams ranges of the region.

One server-streaming method, ``/kvmesh.transfer.v1.Transfer/Read``. Messages are raw
bytes, not protobuf (no stubs to generate, and no protobuf copy of the payload):

* request: msgpack ``{"extents": <bytes>, "lease": <bytes>}``, the extents as
  little-endian uint64 ``offset, size`` pairs, and the id of the store lease that pins
  them;
* response: a stream of frames. A frame is one byte ``h``, then ``h`` bytes of msgpack
  ``[dest_offset, length]``, then ``length`` payload bytes to be placed at
  ``dest_offset`` of the reader's destination (extents back to back from 0). Small
  extents are packed together and large ones cut, so every frame but the last carries
  ``chunk_bytes`` (1 MiB) of payload.

The reader's deadline is the call's gRPC timeout; message limits are raised on both ends.

Throughput is bounded by CPU, not by loopback: every byte is copied four times in user
space (frame, gRPC slice, Python bytes, destination) plus twice by TCP, and glibc's
allocator hands gRPC's 1 MiB buffers back to the kernel after each message, so every
message page-faults its memory in again. Processes that move much data this way should
run with ``MALLOC_MMAP_THRESHOLD_=16777216 MALLOC_TRIM_THRESHOLD_=67108864``
(``kv_store.malloc_tuning``; every ``kvmesh`` command applies them to itself): measured
here, that halves the reader's CPU per byte (4 MiB reads: 4.7 → 2.0 ms of CPU; 0.7 →
1.1-1.4 GB/s on a busy 2-core machine).
Who may read: with a cluster secret the source refuses every call without it
(``UNAUTHENTICATED``, ``kvmesh.kv_store.auth``); with a lease check (a store's source:
``TieredStore.lease_covers``) it serves only extents that a live lease pins, to a reader
holding that lease's id (``PERMISSION_DENIED`` otherwise), so the arena's other bytes -- other
requests' blocks, free slots -- are never sent. A source made without a lease check
serves its whole region (a buffer of one's own, as in the benchmarks).
The server checks every extent against the region (``INVALID_ARGUMENT`` otherwise) and
the reader checks every frame against its request, so neither side trusts the other's
sizes. A reader cannot make the server do more than a bounded amount of work: a
request holds at most ``MAX_REQUEST_BYTES`` of extents (65536), and its stream is
cancelled after ``max_stream_s`` (a reader that stops reading holds a server thread no
longer, and one that asks for the region many times over gets what that time allows);
beyond ``4 * max_workers`` calls at
once the server answers ``RESOURCE_EXHAUSTED`` rather than queueing them.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Callable, Iterable, Sequence

import grpc
import grpc.experimental  # noqa: F401  (ChannelOptions)
import msgpack
import numpy as np

from kvmesh_proto.options import bind_port, host_port, message_options, split_host_port
from kvmesh.kv_store.auth import call_metadata, server_interceptors
from kvmesh.kv_store.transfer.base import (
    Deadline, Extent, Reader, ReaderBroken, SourceRegion, TransferError, check_dest, check_extents,
    decode_descriptor, encode_descriptor, split_pieces,
)

NAME = "grpc"
SERVICE = "kvmesh.transfer.v1.Transfer"
READ_METHOD = f"/{SERVICE}/Read"
# 1 MiB frames: measured here against 512 KiB, 2 MiB and 4 MiB, the fastest for 4 MiB and
# 64 MiB reads (the server builds the next frame while the reader copies the last one; 4 MiB
# frames were the slowest). Raising HTTP/2's frame size and windows did not help.
CHUNK_BYTES = 1 << 20
_MAX_MESSAGE = 64 << 20
MAX_REQUEST_BYTES = 1 << 20  # of a Read request: 65536 extents



def _reader_options() -> list[tuple[str, int]]:
    # Consume the response stream on the calling thread: without it grpcio starts a
    # thread per call. Measured here: 15-30 % less client CPU per 4 MiB read.
    option = getattr(getattr(grpc, "experimental", None), "ChannelOptions", None)
    option = getattr(option, "SingleThreadedUnaryStream", None)
    return [(option, 1)] if option else []


_READER_OPTIONS = _reader_options()


LeaseCheck = Callable[[bytes, Iterable[tuple[int, int]]], bool]  # (lease id, extents) -> covered


def _pack_request(pairs: list[tuple[int, int]], lease: bytes) -> bytes:
    return msgpack.packb({"extents": np.asarray(pairs, dtype="<u8").tobytes(), "lease": bytes(lease)},
                         use_bin_type=True)


def _unpack_request(request: bytes) -> tuple[list[tuple[int, int]], bytes]:
    """The request's extents and lease id (``b""`` when it names none)."""
    msg = msgpack.unpackb(request, raw=False)
    raw = msg["extents"]
    if len(raw) % 16:
        raise ValueError("extents are not whole (offset, size) pairs")
    lease = msg.get("lease", b"")
    if not isinstance(lease, bytes):
        raise ValueError("the lease id is not bytes")
    return [(int(o), int(s)) for o, s in np.frombuffer(raw, dtype="<u8").reshape(-1, 2)], lease


class GrpcSource(SourceRegion):
    """Serves ``region`` (a ``HostTier`` or any buffer) on ``address``
    (``host:port`` or ``[v6]:port``; port 0 picks a free one; ``unix:/path`` works too).
    Its descriptor names ``advertise_host`` (with the bound port) where given: the host
    readers reach it by, which a wildcard bind address such as ``0.0.0.0`` is not.

    ``secret``: the cluster secret every read must carry (None: none is asked).
    ``lease_check``: asked ``(lease id, extents)`` before each read, which it refuses
    unless the answer is true (None: every extent of the region is served).

    ``frame_delay_s`` sleeps before each frame: fault injection for tests of stalled
    sources, 0 in service."""

    name = NAME

    def __init__(self, region, address: str = "127.0.0.1:0", chunk_bytes: int = CHUNK_BYTES,
                 max_workers: int = 4, frame_delay_s: float = 0.0, max_stream_s: float = 60.0,
                 advertise_host: str | None = None, secret: str | None = None,
                 lease_check: LeaseCheck | None = None):
        self.chunk_bytes = int(chunk_bytes)
        self.frame_delay_s = frame_delay_s
        self.max_stream_s = max_stream_s
        self.lease_check = lease_check
        self._stopped = threading.Event()
        options = [(k, MAX_REQUEST_BYTES if k == "grpc.max_receive_message_length" else v)
                   for k, v in message_options(_MAX_MESSAGE)]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                              thread_name_prefix="kv-transfer"),
                                   options=options, maximum_concurrent_rpcs=4 * max_workers,
                                   interceptors=server_interceptors(secret))
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Read": grpc.unary_stream_rpc_method_handler(self._read)})
        self._server.add_generic_rpc_handlers((handler,))
        try:  # bound before the region is viewed: a failure leaves no view of it behind
            if address.startswith("unix:"):
                if self._server.add_insecure_port(address) == 0:
                    raise OSError(f"gRPC transfer source could not bind {address}")
                self.address = address
            else:
                host, port = split_host_port(address)
                try:
                    port = bind_port(self._server, host, port, "the gRPC transfer source")
                except RuntimeError as e:
                    raise OSError(str(e)) from None
                self.address = host_port(advertise_host or host, port)
        except BaseException:
            self._server.stop(None)
            raise
        buffer = region.buffer() if hasattr(region, "buffer") else region
        view = memoryview(buffer)  # our own view: released by close, before the tier's
        self._view = view if view.format == "B" and view.ndim == 1 else view.cast("B")
        self.region_bytes = self._view.nbytes
        self._server.start()
        self._descriptor = encode_descriptor(NAME, address=self.address, size=self.region_bytes)
        self._lock = threading.Lock()
        self._closed = False

    def descriptor(self) -> bytes:
        return self._descriptor

    def _read(self, request: bytes, context):
        try:
            asked, lease = _unpack_request(request)
            pairs, _ = check_extents(asked, self.region_bytes)
        except Exception as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad extents: {e}")
        if self.lease_check is not None and not (lease and self.lease_check(lease, pairs)):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "the extents are not all pinned by a live lease of the id given")
        cutoff = threading.Timer(self.max_stream_s, context.cancel)  # unblocks a stalled write too
        cutoff.daemon = True
        cutoff.start()
        try:
            view = self._view
            for piece in split_pieces(pairs, self.chunk_bytes):
                if self._stopped.is_set() or not context.is_active():
                    return
                if self.frame_delay_s:
                    if self._stopped.wait(self.frame_delay_s):
                        return
                length = sum(size for _, _, size in piece)
                header = msgpack.packb([piece[0][1], length])
                parts = [bytes((len(header),)), header]
                parts.extend(view[src:src + size] for src, _, size in piece)
                yield b"".join(parts)
        finally:
            cutoff.cancel()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stopped.set()
        self._server.stop(grace=None).wait()
        self._view.release()


class GrpcReader(Reader):
    """Reads extents of one ``GrpcSource``'s region; every call carries ``secret``."""

    name = NAME

    def __init__(self, descriptor: bytes | dict, secret: str | None = None):
        d = descriptor if isinstance(descriptor, dict) else decode_descriptor(descriptor)
        if d.get("backend") != NAME:
            raise ValueError(f"not a grpc descriptor: {d.get('backend')!r}")
        self._metadata = call_metadata(secret)
        self.address = d["address"]
        self.region_bytes = int(d["size"])
        self._channel = grpc.insecure_channel(
            self.address, options=message_options(_MAX_MESSAGE) + _READER_OPTIONS)
        self._call = self._channel.unary_stream(READ_METHOD)
        self._closed = False
        self._in_flight = 0
        self._lock = threading.Lock()

    def stats(self) -> dict[str, int]:
        return {"registered": 0, "in_flight": self._in_flight}

    def read(self, extents: Sequence[Extent], dest, deadline_s: float, lease: bytes = b"") -> None:
        pairs, total = check_extents(extents, self.region_bytes)
        out = check_dest(dest, total)
        deadline = Deadline(deadline_s)
        if self._closed:
            raise ReaderBroken("grpc reader is closed")
        if total == 0:
            return
        timeout = deadline.check(f"grpc read from {self.address}")
        with self._lock:
            self._in_flight += 1
        call = None
        try:
            call = self._call(_pack_request(pairs, lease), timeout=timeout, metadata=self._metadata)
            got = 0
            for frame in call:
                frame = memoryview(frame)
                h = frame[0]
                offset, length = msgpack.unpackb(frame[1:1 + h])
                if offset != got or length != len(frame) - 1 - h or got + length > total:
                    raise TransferError(f"grpc read from {self.address}: bad frame "
                                        f"({offset}, {length}) after {got} of {total} bytes")
                out[offset:offset + length] = frame[1 + h:]
                got += length
            if got != total:
                raise TransferError(f"grpc read from {self.address}: stream ended after "
                                    f"{got} of {total} bytes")
            deadline.check(f"grpc read from {self.address}")
        except grpc.RpcError as e:  # the call is also a grpc.Call: code() and details()
            code = e.code() if isinstance(e, grpc.Call) else None
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            raise TransferError(f"grpc read from {self.address}: "
                                f"{code.name if code else 'ERROR'}: {details}") from None
        except (ValueError, TypeError, IndexError) as e:  # closed channel, unparsable frame
            raise TransferError(f"grpc read from {self.address}: {type(e).__name__}: {e}") from None
        finally:
            if call is not None:
                call.cancel()  # no-op once the stream is complete
            with self._lock:
                self._in_flight -= 1

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._channel.close()
