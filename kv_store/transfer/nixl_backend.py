"""One-sided reads through NIXL (UCX): the reader pulls the bytes, the store's CPU idles.

Source: a NIXL agent with the UCX backend registers the region (``DRAM``); the
descriptor carries the agent's metadata and the region's base address and length.
Reader: its own agent registers the destination buffer (registrations are cached: a
later read into the same buffer, or a slice of it, reuses them), loads the source's
metadata and READs the extents: one transfer request per piece of at most
``max_post_bytes``, each with one descriptor per extent. It polls the transfer until
DONE, ERR or the deadline, and releases the request in every case.

Measured facts this module is built on (NIXL 1.5.1, UCX on one host, no RDMA):

* UCX picks ``cma`` (``process_vm_readv``) between processes of one host, and a READ is
  executed inside ``transfer()`` itself: the call returns when the bytes are there. A
  large read therefore cannot be interrupted: it is cut into pieces of at most
  ``max_post_bytes`` (16 MiB: 2-8 ms here) and the deadline is checked between pieces.
* NIXL's own progress thread busy-polls: an idle agent burns 35-50 % of a core. Both
  sides run without it. The reader progresses its worker by polling its transfers. The
  source must still progress for the readers' connection set-up (UCX wire-up), so a
  light thread of the source progresses it every ``progress_interval_s`` (2 ms:
  negligible CPU; the first read of a new reader takes a few ms longer). Over a
  transport that is not one-sided (TCP between hosts) the source must progress for
  every read: pass ``progress_interval_s=0`` to use NIXL's progress thread instead.
* A READ towards a source process that has exited fails with
  ``NIXL_ERR_REMOTE_DISCONNECT``; the reader turns it into ``TransferError``.
* Closing the source (deregistering the region, dropping the agent) stops new readers
  from attaching, but readers already attached can still read the region over ``cma``
  while it stays mapped: the kernel checks only process permissions. Such reads cannot
  harm the store, and once the store process exits they fail. Blocks that may change
  under a reader need the store's pins (and the block checksums), whatever the backend.

Listening: UCX's TCP transport listens on every network interface of the host (for
connection set-up), so a store bound to 127.0.0.1 had a UCX listener on the machine's
external address too. NIXL's per-backend device list cannot narrow that (it names
InfiniBand ports), so an agent given a ``host`` is created with ``UCX_NET_DEVICES`` naming
the interface that holds that address (and the host's InfiniBand ports, which open no IP
listener): its only TCP listener is on that interface, at the interface's own address
(UCX binds an interface's first address: 127.0.0.1 for any loopback host). A wildcard
host (``0.0.0.0``, ``::``) or a ``UCX_NET_DEVICES`` already set leaves UCX's choice. The
store's source is made so. A reader is not: narrowed to its own address's interface, a
reader could not reach a source listening on another interface of the same host (the
read hung, or loading the source's metadata failed), so a worker's reader still listens
on every interface unless ``UCX_NET_DEVICES`` says otherwise. Its registered memory is
described to nobody (the reader never hands out its metadata), so a peer that connects
there can read nothing.

Environment, set before NIXL is first imported unless already set: ``UCX_MODULES=^ib``
where the host has no InfiniBand device (with Debian's ``libibverbs1`` installed, a
process holding a UCX agent otherwise segfaults at exit); ``NIXL_LOG_LEVEL=WARN`` (NIXL
logs every agent's creation at INFO to stdout) and ``UCX_LOG_FILE=stderr`` (UCX's
warnings go to stdout by default), so that stdout stays the program's.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import itertools
import os
import socket
import struct
import threading
import time
import uuid
from typing import Sequence

import numpy as np

from kvmesh.kv_store.transfer.base import (
    Deadline, Extent, Reader, ReaderBroken, SourceRegion, TransferError, check_dest, check_extents,
    decode_descriptor, encode_descriptor, split_pieces,
)

NAME = "nixl"
MAX_POST_BYTES = 16 << 20
PROGRESS_INTERVAL_S = 0.002

_agent_ids = itertools.count()


def _prepare_environment() -> None:
    # NIXL's Python logger writes INFO lines (one per agent) to stdout: keep stdout for
    # the program unless the user asked for them.
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    os.environ.setdefault("UCX_LOG_FILE", "stderr")  # UCX warns on stdout by default
    if "UCX_MODULES" in os.environ:
        return
    try:
        has_ib = bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        has_ib = False
    if not has_ib:
        os.environ["UCX_MODULES"] = "^ib"


def nixl_api():
    """The ``nixl._api`` module; ``TransferError`` saying why if NIXL is unusable."""
    _prepare_environment()
    try:
        from nixl import _api
    except Exception as e:  # not installed, or its libraries fail to load
        raise TransferError(f"NIXL is not usable here: {type(e).__name__}: {e} "
                            "(pip install nixl)") from None
    return _api


def nixl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nixl") is not None


_SIOCGIFCONF, _SIOCGIFNETMASK = 0x8912, 0x891B


def _ipv4_interfaces() -> list[tuple[str, ipaddress.IPv4Interface]]:
    """(device, address/netmask) of every IPv4 address of this host (alias labels such as
    ``eth0:1`` name their device)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        buffer = array.array("B", b"\0" * 40 * 256)
        address, _ = buffer.buffer_info()
        length = struct.unpack("iL", fcntl.ioctl(s.fileno(), _SIOCGIFCONF,
                                                 struct.pack("iL", len(buffer), address)))[0]
        raw = buffer.tobytes()[:length]
        for i in range(0, length, 40):  # struct ifreq: 16-byte name, then a sockaddr_in
            label = raw[i:i + 16].split(b"\0", 1)[0].decode()
            ip = socket.inet_ntoa(raw[i + 20:i + 24])
            try:
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFNETMASK,
                                                    struct.pack("256s", label.encode()))[20:24])
            except OSError:
                mask = "255.255.255.255"
            out.append((label.split(":")[0], ipaddress.IPv4Interface(f"{ip}/{mask}")))
    return out


def _ipv6_interfaces() -> list[tuple[str, ipaddress.IPv6Interface]]:
    out = []
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr, _, prefix, _, _, device = line.split()
                ip = ":".join(hexaddr[i:i + 4] for i in range(0, 32, 4))
                out.append((device, ipaddress.IPv6Interface(f"{ip}/{int(prefix, 16)}")))
    except (OSError, ValueError):
        pass
    return out


def net_device_of(host: str) -> str | None:
    """The network interface of this host that holds ``host``'s address (exactly, else
    within its subnet, as 127.0.0.2 is lo's); None when no interface does."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:  # a name: what it resolves to
            ip = ipaddress.ip_address(socket.getaddrinfo(host, None)[0][4][0])
        except (OSError, IndexError, ValueError):
            return None
    try:
        interfaces = _ipv4_interfaces() if ip.version == 4 else _ipv6_interfaces()
    except OSError:
        return None
    exact = [device for device, iface in interfaces if iface.ip == ip]
    within = [device for device, iface in interfaces if ip in iface.network]
    return (exact or within or [None])[0]


def ucx_net_devices(host: str | None) -> str | None:
    """The ``UCX_NET_DEVICES`` value that keeps an agent's TCP listener on ``host``'s
    interface: that interface plus the InfiniBand ports. None when ``host`` is None or a
    wildcard, or ``UCX_NET_DEVICES`` is set already (the user's choice stands).
    ``TransferError`` when no interface of this host holds ``host``'s address."""
    if host is None or host.strip("[]") in ("", "0.0.0.0", "::") or "UCX_NET_DEVICES" in os.environ:
        return None
    device = net_device_of(host)
    if device is None:
        raise TransferError(f"no network interface of this host has the address {host}: "
                            "NIXL's UCX listener cannot be kept to it")
    ports = []
    try:
        for ib in sorted(os.listdir("/sys/class/infiniband")):
            ports += [f"{ib}:{p}" for p in sorted(os.listdir(f"/sys/class/infiniband/{ib}/ports"))]
    except OSError:
        pass
    return ",".join([device, *ports])


_env_lock = threading.Lock()


def _make_agent(role: str, progress_thread: bool, host: str | None = None):
    """A NIXL agent with the UCX backend; with ``host``, UCX listens on that address's
    interface only (``ucx_net_devices``)."""
    api = nixl_api()
    name = f"kvmesh-{role}-{os.getpid()}-{next(_agent_ids)}-{uuid.uuid4().hex[:8]}"
    config = api.nixl_agent_config(
        enable_prog_thread=progress_thread, enable_listen_thread=False, backends=["UCX"],
        # thread-safe agent calls: the source's progress thread runs beside its owner
        sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    devices = ucx_net_devices(host)
    try:
        with _env_lock:  # UCX reads its configuration from the environment as the agent starts
            if devices is not None:
                os.environ["UCX_NET_DEVICES"] = devices
            try:
                agent = api.nixl_agent(name, config)
            finally:
                if devices is not None:
                    os.environ.pop("UCX_NET_DEVICES", None)
    except Exception as e:
        raise TransferError(f"NIXL agent did not start: {type(e).__name__}: {e}") from None
    if "UCX" not in agent.backends:
        raise TransferError(f"NIXL's UCX backend is not available (plugins: {agent.get_plugin_list()})")
    return agent


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0


def _whole_buffer(view: memoryview, start: int) -> tuple[int, int]:
    """The range to register for a read into ``view``: the whole buffer ``view`` is a
    slice of (a KV cache tensor, an arena) when it is contiguous, so that later reads
    into other slices of it find the registration; else ``view`` itself."""
    try:
        whole = memoryview(view.obj)
        if whole.c_contiguous:
            whole = whole if whole.format == "B" and whole.ndim == 1 else whole.cast("B")
            whole_start = _address(whole)
            if whole_start <= start and start + view.nbytes <= whole_start + whole.nbytes:
                return whole_start, whole.nbytes
    except (TypeError, ValueError):
        pass
    return start, view.nbytes


class NixlSource(SourceRegion):
    """Registers ``region`` (a ``HostTier`` or any buffer) with a NIXL agent whose UCX
    listener is on ``host``'s interface (None: every interface). Close it before the
    region goes away."""

    name = NAME

    def __init__(self, region, progress_interval_s: float = PROGRESS_INTERVAL_S, host: str | None = None):
        buffer = region.buffer() if hasattr(region, "buffer") else region
        view = memoryview(buffer)
        self._view = view if view.format == "B" and view.ndim == 1 else view.cast("B")
        self.region_bytes = self._view.nbytes
        self.base = _address(self._view)
        self._agent = _make_agent("source", progress_thread=progress_interval_s <= 0, host=host)
        try:
            self._reg = self._agent.register_memory([(self.base, self.region_bytes, 0, "")],
                                                    "DRAM", backends=["UCX"])
            metadata = self._agent.get_agent_metadata()
        except Exception as e:
            self._agent = None
            raise TransferError(f"NIXL could not register the region: {type(e).__name__}: {e}") from None
        self._descriptor = encode_descriptor(NAME, agent=self._agent.name, md=metadata,
                                             base=self.base, size=self.region_bytes)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        if progress_interval_s > 0:
            self._thread = threading.Thread(target=self._progress, args=(progress_interval_s,),
                                            name="kv-transfer-nixl-progress", daemon=True)
            self._thread.start()

    def _progress(self, interval: float) -> None:
        agent = self._agent
        while not self._stop.wait(interval):
            try:
                agent.get_new_notifs()  # progresses the UCX worker (connection set-up)
            except Exception:
                pass

    def descriptor(self) -> bytes:
        return self._descriptor

    def close(self) -> None:
        with self._lock:
            if self._agent is None:
                return
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            agent, self._agent = self._agent, None
            try:
                agent.deregister_memory(self._reg)
            except Exception:
                pass
            self._reg = None
            del agent  # the agent's destructor tears down its UCX worker
            self._view.release()


class _Registration:
    __slots__ = ("start", "end", "descs", "pinned")

    def __init__(self, start: int, end: int, descs, pinned: bool):
        self.start, self.end, self.descs, self.pinned = start, end, descs, pinned


class NixlReader(Reader):
    """Reads extents of one ``NixlSource``'s region into local memory.

    ``register(buffer)`` registers a long-lived destination up front (a KV cache) and
    keeps it until ``close``; other destinations are registered on first use (the whole
    buffer they are a slice of) and cached, the ``max_registrations`` most recently used
    kept. A cached registration is only
    valid while its memory lives: read into long-lived buffers, or ``unregister`` them.
    Reads are serialised (one agent, not thread-safe)."""

    name = NAME

    def __init__(self, descriptor: bytes | dict, max_post_bytes: int = MAX_POST_BYTES,
                 max_registrations: int = 8):
        d = descriptor if isinstance(descriptor, dict) else decode_descriptor(descriptor)
        if d.get("backend") != NAME:
            raise ValueError(f"not a nixl descriptor: {d.get('backend')!r}")
        self.region_bytes = int(d["size"])
        self.remote_base = int(d["base"])
        self.max_post_bytes = int(max_post_bytes)
        self.max_registrations = int(max_registrations)
        self._lock = threading.Lock()
        self._regs: list[_Registration] = []  # most recently used last
        self._stuck: list = []  # transfer handles whose release failed; retried later
        self._active = 0
        self._broken: str | None = None
        self._agent = _make_agent("reader", progress_thread=False)
        try:
            self.remote = self._agent.add_remote_agent(d["md"])
        except Exception as e:
            self._agent = None
            raise TransferError(f"NIXL could not load the source's metadata: "
                                f"{type(e).__name__}: {e}") from None

    # ---------------------------------------------------------------- registrations

    def stats(self) -> dict[str, int]:
        return {"registered": len(self._regs), "in_flight": len(self._stuck) + self._active}

    def register(self, buffer) -> None:
        """Register ``buffer`` as a destination until ``close`` (or ``unregister``)."""
        view = check_dest(buffer, 0)
        with self._lock:
            self._require_open()
            reg = self._find(_address(view), view.nbytes)
            if reg is None:
                reg = self._register(_address(view), view.nbytes)
            reg.pinned = True

    def unregister(self, buffer) -> None:
        view = check_dest(buffer, 0)
        start = _address(view)
        with self._lock:
            for reg in list(self._regs):
                if reg.start == start and reg.end == start + view.nbytes:
                    self._deregister(reg)

    def _find(self, start: int, size: int) -> _Registration | None:
        for reg in reversed(self._regs):
            if reg.start <= start and start + size <= reg.end:
                self._regs.remove(reg)
                self._regs.append(reg)
                return reg
        return None

    def _register(self, start: int, size: int) -> _Registration:
        try:
            descs = self._agent.register_memory([(start, size, 0, "")], "DRAM", backends=["UCX"])
        except Exception as e:
            raise TransferError(f"NIXL could not register the destination: "
                                f"{type(e).__name__}: {e}") from None
        reg = _Registration(start, start + size, descs, pinned=False)
        self._regs.append(reg)
        unpinned = [r for r in self._regs if not r.pinned and r is not reg]
        while len(self._regs) > self.max_registrations and unpinned:
            self._deregister(unpinned.pop(0))
        return reg

    def _deregister(self, reg: _Registration) -> None:
        if reg in self._regs:
            self._regs.remove(reg)
        try:
            self._agent.deregister_memory(reg.descs)
        except Exception:
            pass

    # ---------------------------------------------------------------- transfers

    def _require_open(self) -> None:
        if self._agent is None:
            raise ReaderBroken("nixl reader is closed")

    def _retry_stuck(self) -> None:
        for handle in list(self._stuck):
            try:
                if self._agent.check_xfer_state(handle) != "PROC":
                    handle.release()
                    self._stuck.remove(handle)
            except Exception:
                pass

    def read(self, extents: Sequence[Extent], dest, deadline_s: float, lease: bytes = b"") -> None:
        pairs, total = check_extents(extents, self.region_bytes)
        out = check_dest(dest, total)
        deadline = Deadline(deadline_s)
        with self._lock:
            self._require_open()
            if total == 0:
                return
            if self._broken:
                raise ReaderBroken(self._broken)
            if self._stuck:
                self._retry_stuck()
            deadline.check("nixl read")
            start = _address(out)
            new_reg = None
            reg = self._find(start, total)
            if reg is None:
                reg = new_reg = self._register(*_whole_buffer(out, start))
            try:
                for piece in split_pieces(pairs, self.max_post_bytes):
                    deadline.check("nixl read")
                    self._transfer(piece, start, deadline)
            except BaseException:
                if new_reg is not None and not self._stuck:
                    self._deregister(new_reg)
                raise

    def _transfer(self, piece, dest_start: int, deadline: Deadline) -> None:
        agent = self._agent
        cols = np.array(piece, dtype=np.uint64)  # source offset, dest offset, size
        local = np.zeros((len(piece), 3), dtype=np.uint64)
        remote = np.zeros((len(piece), 3), dtype=np.uint64)
        np.add(cols[:, 1], np.uint64(dest_start), out=local[:, 0])
        np.add(cols[:, 0], np.uint64(self.remote_base), out=remote[:, 0])
        local[:, 1] = remote[:, 1] = cols[:, 2]
        handle = None
        self._active += 1
        try:
            handle = agent.initialize_xfer("READ", agent.get_xfer_descs(local, "DRAM"),
                                           agent.get_xfer_descs(remote, "DRAM"), self.remote)
            state = agent.transfer(handle)
            spins = 0
            while state == "PROC":
                left = deadline.remaining()
                if left <= 0:
                    break
                spins += 1
                if spins > 64:  # waiting on the peer (connection set-up): yield the core
                    time.sleep(min(left, 0.0002 * min(spins - 64, 10)))
                state = agent.check_xfer_state(handle)
            if state == "ERR":
                raise TransferError("nixl read: the transfer failed (NIXL state ERR)")
            if state == "PROC":
                deadline.check("nixl read")
        except TransferError:
            raise
        except Exception as e:
            message = f"nixl read: {type(e).__name__}: {e}"
            if "DISCONNECT" in str(e).upper():
                self._broken = f"nixl source is gone ({message}); open a new reader"
                raise ReaderBroken(self._broken) from None
            raise TransferError(message) from None
        finally:
            self._active -= 1
            if handle is not None:
                try:
                    handle.release()  # cancels it if still in progress
                except Exception:
                    self._stuck.append(handle)

    def close(self) -> None:
        with self._lock:
            if self._agent is None:
                return
            self._retry_stuck()
            for reg in list(self._regs):
                self._deregister(reg)
            try:
                self._agent.remove_remote_agent(self.remote)
            except Exception:
                pass
            self._agent = None
