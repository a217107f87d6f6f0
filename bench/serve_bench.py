"""``kvmesh bench serve``: kvmesh against one plain vLLM server, end to end.

In one run, one after the other and each from empty caches, a kvmesh cluster on this
machine (store, prefill worker, decode worker, router) and a plain vLLM OpenAI server
serve the same workload (``serve_workloads``), sent through the OpenAI streaming API by
vLLM's own benchmark request functions (``serve_client``). Both systems get the same
model, the same vLLM engine flags, the same KV cache size and vLLM multiprocessing
setting, and the same cores (``serve_systems``); each gets a few untimed warm-up requests
on text the workload never uses.

Prints one JSON line (``serve_report.build_report``): per system the time to first token
per request kind, inter-token latency, output tokens/s and request counts; the output
check (greedy decoding: both must give the same text and token ids for every request);
the ratios kvmesh / plain vLLM only when the outputs are identical; kvmesh's breakdown of
its slowest requests of the workload's focus kind (follow-up turns, revisits, short
requests) and the store's tier figures. With ``--plot PATH`` a PNG of the latency
distributions (``serve_plot``); with ``--records PATH`` every request's outcome as JSON,
from which ``report_from_records`` rebuilds the report.

Exit status: 0 when every request succeeded and (with both systems) the outputs are
identical; 1 otherwise (the JSON still says what happened); 130 when interrupted.
Everything started is stopped on the way out, whatever the way.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvmesh.bench import serve_systems, serve_workloads
from kvmesh.bench.serve_client import APIS, Record, Run, drive
from kvmesh.bench.serve_report import build_report
from kvmesh.cluster.models import MODEL_NAMES

SYSTEMS = ("kvmesh", "vllm")

# Engine flags per workload when none are given (vLLM's own flags, given to both systems).
DEFAULT_ENGINE_ARGS = {
    "multi-turn": "--dtype float32 --block-size 32 --max-model-len 4096",
    # 64 blocks of 32 tokens: 2,048 tokens of KV per engine, so that a working set of 4x that
    # takes few and short prompts.
    # (vLLM keeps one block back: 64 blocks serve at most 2,016 tokens)
    "cache-pressure": "--dtype float32 --block-size 32 --num-gpu-blocks-override 64 --max-model-len 2000",
    "interference": "--dtype float32 --block-size 32 --max-model-len 4096",
}


@dataclass(frozen=True)
class ServeBenchSettings:
    """Every knob of the benchmark; the command line's defaults and help come from here.
    None for a size means the workload's own default (see ``WORKLOAD_DEFAULTS``)."""

    workload: str = "multi-turn"
    model: str | None = None          # a Hugging Face model directory; None: the --size model
    size: str = "smollm2"
    engine_flags: str | None = None   # vLLM engine flags for both systems; None: DEFAULT_ENGINE_ARGS
    kv_cache_gib: int = 1
    multiprocessing: bool = True
    api: str = "chat"
    systems: tuple[str, ...] = SYSTEMS
    seed: int = 0
    # multi-turn
    users: int = 4
    turns: int = 4
    document_tokens: int | None = None
    question_tokens: int = 32
    answer_tokens: int | None = None
    shared_document: bool = False
    user_interval: float = 1.0
    think_time: float = 0.0
    # cache pressure
    documents: int | None = None
    passes: int = 3
    clients: int = 1
    # interference
    long_prompts: int = 4
    long_tokens: int = 3000
    long_interval: float = 3.0
    short_requests: int = 30
    short_tokens: int = 48
    short_interval: float = 0.4
    # kvmesh's store (None: the workload's default, ``WORKLOAD_DEFAULTS``)
    store_host_bytes: int | None = None
    store_disk_bytes: int | None = None
    # limits and outputs
    request_timeout: float = 600.0
    start_timeout: float = 600.0
    plot: str | None = None
    records: str | None = None

    def __post_init__(self) -> None:
        if self.workload not in serve_workloads.WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose one of "
                             f"{', '.join(serve_workloads.WORKLOADS)}")
        if self.api not in APIS:
            raise ValueError(f"unknown API {self.api!r}; choose one of {', '.join(APIS)}")
        if not self.systems or len(set(self.systems)) != len(self.systems) \
                or not set(self.systems) <= set(SYSTEMS):
            raise ValueError(f"systems must be one or both of {', '.join(SYSTEMS)}, each once")
        if self.request_timeout <= 0 or self.start_timeout <= 0:
            raise ValueError("timeouts must be above 0 seconds")

    def engine_flag_list(self) -> list[str]:
        text = DEFAULT_ENGINE_ARGS[self.workload] if self.engine_flags is None else self.engine_flags
        flags = shlex.split(text)
        serve_systems.parse_flags(flags)  # a clear error for a malformed list
        for name in ("--model", "--served-model-name", "--host", "--port"):
            if name in serve_systems.parse_flags(flags):
                raise ValueError(f"{name} is the benchmark's to set; leave it out of the engine arguments")
        return flags


WORKLOAD_DEFAULTS = {  # sizes whose default depends on the workload
    # a host tier that holds every conversation (float32 SmolLM2: 4 users' ~2,400 tokens
    # come to ~9,000 blocks of one layer, each in a 64 KiB slot: ~0.6 GB): a follow-up a
    # prefill worker computes finds its whole history there
    "multi-turn": {"document_tokens": 2000, "answer_tokens": 64,
                   "store_host_bytes": 1 << 30, "store_disk_bytes": 0},
    # a host tier smaller than the working set (float32 SmolLM2: ~0.6 GB with the answers)
    # and a disk tier that holds it: revisits come from both tiers
    "cache-pressure": {"document_tokens": 1024, "answer_tokens": 16,
                       "store_host_bytes": 256 << 20, "store_disk_bytes": 2 << 30},
    "interference": {"answer_tokens": 16, "store_host_bytes": 512 << 20, "store_disk_bytes": 0},
}


def _size(settings: ServeBenchSettings, name: str) -> int:
    value = getattr(settings, name)
    return WORKLOAD_DEFAULTS[settings.workload].get(name) if value is None else value


def build_workload(settings: ServeBenchSettings, tokenizer) -> serve_workloads.Workload:
    """The workload ``settings`` describe, in tokens of ``tokenizer``."""
    s, flags = settings, settings.engine_flag_list()
    if s.workload == "multi-turn":
        return serve_workloads.multi_turn(
            tokenizer, users=s.users, turns=s.turns, document_tokens=_size(s, "document_tokens"),
            question_tokens=s.question_tokens, answer_tokens=_size(s, "answer_tokens"),
            shared_document=s.shared_document, user_interval_s=s.user_interval,
            think_time_s=s.think_time, seed=s.seed)
    if s.workload == "cache-pressure":
        blocks = serve_systems.flag_int(flags, "--num-gpu-blocks-override")
        if blocks is None:
            raise ValueError("the cache-pressure workload sizes its working set from the engine's KV "
                             "cache: give --num-gpu-blocks-override N (with --block-size) in the engine "
                             "arguments")
        return serve_workloads.cache_pressure(
            tokenizer, engine_kv_tokens=blocks * serve_systems.flag_int(flags, "--block-size", 32),
            document_tokens=_size(s, "document_tokens"), question_tokens=s.question_tokens,
            answer_tokens=_size(s, "answer_tokens"), passes=s.passes, clients=s.clients,
            documents=s.documents, seed=s.seed)
    return serve_workloads.interference(
        tokenizer, long_prompts=s.long_prompts, long_tokens=s.long_tokens,
        long_interval_s=s.long_interval, short_requests=s.short_requests, short_tokens=s.short_tokens,
        short_interval_s=s.short_interval, answer_tokens=_size(s, "answer_tokens"), seed=s.seed)


def _machine() -> dict:
    processor = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"arch": platform.machine(), "cpus": len(os.sched_getaffinity(0)), "processor": processor}


def _say(message: str) -> None:
    print(f"kvmesh bench serve: {message}", file=sys.stderr, flush=True)


def _run_on(endpoint, workload, warm, settings: ServeBenchSettings) -> Run:
    _say(f"{endpoint.name}: warm-up ({warm.requests} untimed requests)")
    warm_run = asyncio.run(drive(warm, endpoint.url, endpoint.model, settings.api, settings.request_timeout))
    failed = [r.error for r in warm_run.records if not r.ok]
    if failed:
        raise serve_systems.StartError(f"{endpoint.name} failed its warm-up requests: {failed[0]} "
                                       f"(logs in {endpoint.log_dir})")
    _say(f"{endpoint.name}: {workload.requests} requests ({workload.name})")
    run = asyncio.run(drive(workload, endpoint.url, endpoint.model, settings.api,
                            settings.request_timeout, progress=lambda m: _say(f"{endpoint.name}: {m}")))
    _say(f"{endpoint.name}: done in {run.duration_s:.1f} s")
    return run


def run(settings: ServeBenchSettings) -> tuple[dict, dict[str, Run]]:
    """Run the benchmark; returns the report and each system's run."""
    from transformers import AutoTokenizer

    from kvmesh.cluster.models import ensure_model, is_model_dir

    if settings.model is not None:
        if not is_model_dir(settings.model):
            raise ValueError(f"{settings.model} is not a Hugging Face model directory "
                             "(no config.json and tokenizer.json)")
        model_dir = Path(settings.model).resolve()
    else:
        model_dir = ensure_model(settings.size)
    name = model_dir.name
    flags = settings.engine_flag_list()
    if "kvmesh" in settings.systems:
        block_size = serve_systems.kvmesh_engine_options(flags)["block_size"]  # refuses early
    else:
        block_size = serve_systems.flag_int(flags, "--block-size", 32)
    env = serve_systems.engine_env(settings.kv_cache_gib, settings.multiprocessing)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    workload = build_workload(settings, tokenizer)
    warm = serve_workloads.warmup(tokenizer, block_size)
    header = {
        "benchmark": "serve", "workload": workload.name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(), "model": str(model_dir.name), "api": settings.api,
        "engine_args": flags, "env": {k: v for k, v in env.items() if k.startswith("VLLM_")},
        "kvmesh_store": {"host_bytes": _size(settings, "store_host_bytes"),
                         "disk_bytes": _size(settings, "store_disk_bytes")},
        "systems_order": list(settings.systems), "workload_config": workload.config,
    }
    runs: dict[str, Run] = {}
    store = None
    base = Path(tempfile.mkdtemp(prefix="kvmesh-bench-serve-"))
    _say(f"logs in {base}")
    for system in settings.systems:
        if system == "kvmesh":
            with serve_systems.start_kvmesh(str(model_dir), name, flags, env,
                                            store_host_bytes=_size(settings, "store_host_bytes"),
                                            store_disk_bytes=_size(settings, "store_disk_bytes"),
                                            start_timeout_s=settings.start_timeout,
                                            run_dir=str(base / "kvmesh"), say=_say) as endpoint:
                runs[system] = _run_on(endpoint, workload, warm, settings)
                store = serve_systems.store_metrics(endpoint.store_metrics_url)
        else:
            with serve_systems.start_plain_vllm(str(model_dir), name, flags, env,
                                                start_timeout_s=settings.start_timeout,
                                                run_dir=str(base / "vllm"), say=_say) as endpoint:
                runs[system] = _run_on(endpoint, workload, warm, settings)
    report = build_report(header, workload.focus, runs, store)
    if settings.records:
        write_records(settings.records, header, workload.focus, runs, store)
    if settings.plot:
        from kvmesh.bench.serve_plot import plot

        report["plot"] = str(plot(runs, settings.plot, f"{workload.name} on {name}: kvmesh vs plain vLLM"))
    return report, runs


def write_records(path: str, header: dict, focus: str, runs: dict[str, Run], store: dict | None) -> None:
    """Every request's outcome, with what ``report_from_records`` needs to rebuild the report."""
    Path(path).write_text(json.dumps({
        "header": header, "focus": focus, "store": store,
        "runs": {name: {"duration_s": r.duration_s, "records": [x.to_dict() for x in r.records]}
                 for name, r in runs.items()}}))


def read_records(path: str) -> tuple[dict, str, dict[str, Run], dict | None]:
    """(header, focus kind, runs, store figures) as ``write_records`` saved them."""
    data = json.loads(Path(path).read_text())
    runs = {name: Run([Record.from_dict(x) for x in r["records"]], r["duration_s"])
            for name, r in data["runs"].items()}
    return data["header"], data["focus"], runs, data["store"]


def report_from_records(path: str) -> dict:
    """The report of a saved run (``--records``)."""
    header, focus, runs, store = read_records(path)
    return build_report(header, focus, runs, store)


def succeeded(report: dict) -> bool:
    """Every request answered, and the outputs identical where two systems ran."""
    failed = any(s["requests"]["failed"] for s in report["systems"].values())
    return not failed and report["outputs_identical"] is not False


# ---------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, at least 0: {value}")
    return value


def _bytes(text: str, zero_ok: bool = False) -> int:
    from kvmesh.kv_store.settings_base import parse_bytes

    try:
        return parse_bytes(text, zero_ok=zero_ok)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bytes_or_zero(text: str) -> int:
    return _bytes(text, zero_ok=True)


def _systems(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names or not set(names) <= set(SYSTEMS) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"one or both of {','.join(SYSTEMS)}, each once: {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``kvmesh bench serve`` flags; defaults from ``ServeBenchSettings``."""
    d = ServeBenchSettings()
    g = p.add_argument_group("what to run")
    g.add_argument("--workload", choices=serve_workloads.WORKLOADS, default=d.workload, help=(
        "multi-turn: users with long documents asking follow-up questions, concurrently; "
        "cache-pressure: questions about more documents than 4x the engine's KV cache holds, "
        "pass after pass; interference: short requests arriving while long cold prompts "
        f"prefill (default {d.workload})"))
    g.add_argument("--model", default=d.model, metavar="DIR",
                   help="a Hugging Face model directory (default: the --size model)")
    g.add_argument("--size", choices=MODEL_NAMES, default=d.size,
                   help=f"model when --model is not given: smollm2 is SmolLM2-135M-Instruct, the others "
                        f"generated ones with random weights (default {d.size})")
    # (dest engine_flags: the kvmesh command line keeps args.engine_args for its own pass-through)
    g.add_argument("--engine-args", dest="engine_flags", default=d.engine_flags, metavar="FLAGS", help=(
        "vLLM engine flags given to both systems, as one quoted string; default per workload: "
        + "; ".join(f"{w}: '{a}'" for w, a in DEFAULT_ENGINE_ARGS.items())))
    g.add_argument("--kv-cache-gib", type=_positive_int, default=d.kv_cache_gib,
                   help=f"VLLM_CPU_KVCACHE_SPACE for both systems, whole GiB (default {d.kv_cache_gib})")
    g.add_argument("--multiprocessing", action=argparse.BooleanOptionalAction, default=d.multiprocessing,
                   help="VLLM_ENABLE_V1_MULTIPROCESSING for both systems (default: on, vLLM's default)")
    g.add_argument("--api", choices=APIS, default=d.api,
                   help=f"OpenAI API the requests use, both streaming (default {d.api})")
    g.add_argument("--systems", type=_systems, default=d.systems, metavar="NAMES",
                   help="which systems to run, in this order (default kvmesh,vllm; one alone gives "
                        "no ratios and no output check)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the workload's text")
    g = p.add_argument_group("multi-turn")
    g.add_argument("--users", type=_positive_int, default=d.users, help=f"conversations at once (default {d.users})")
    g.add_argument("--turns", type=_positive_int, default=d.turns, help=f"questions per user (default {d.turns})")
    g.add_argument("--document-tokens", type=_positive_int, default=None,
                   help="tokens per document (default 2000 multi-turn, 1024 cache-pressure)")
    g.add_argument("--question-tokens", type=_positive_int, default=d.question_tokens,
                   help=f"tokens per question (default {d.question_tokens})")
    g.add_argument("--answer-tokens", type=_positive_int, default=None,
                   help="tokens generated per request (default 64 multi-turn, 16 otherwise)")
    g.add_argument("--shared-document", action="store_true",
                   help="every user reads the same document (default: one each)")
    g.add_argument("--user-interval", type=_seconds, default=d.user_interval,
                   help=f"seconds between users' first questions (default {d.user_interval})")
    g.add_argument("--think-time", type=_seconds, default=d.think_time,
                   help=f"seconds a user waits after an answer before the next question (default {d.think_time})")
    g = p.add_argument_group("cache-pressure")
    g.add_argument("--documents", type=_positive_int, default=None,
                   help="documents (default: enough for a working set over 4x the engine's KV cache, "
                        "sized from --num-gpu-blocks-override and --block-size)")
    g.add_argument("--passes", type=_positive_int, default=d.passes,
                   help=f"passes over the documents, the first cold (default {d.passes})")
    g.add_argument("--clients", type=_positive_int, default=d.clients,
                   help=f"requests in flight at once (default {d.clients})")
    g = p.add_argument_group("interference")
    g.add_argument("--long-prompts", type=_positive_int, default=d.long_prompts,
                   help=f"long cold prompts (default {d.long_prompts})")
    g.add_argument("--long-tokens", type=_positive_int, default=d.long_tokens,
                   help=f"tokens per long prompt (default {d.long_tokens})")
    g.add_argument("--long-interval", type=_seconds, default=d.long_interval,
                   help=f"seconds between long prompts (default {d.long_interval})")
    g.add_argument("--short-requests", type=_positive_int, default=d.short_requests,
                   help=f"short requests (default {d.short_requests})")
    g.add_argument("--short-tokens", type=_positive_int, default=d.short_tokens,
                   help=f"tokens per short prompt (default {d.short_tokens})")
    g.add_argument("--short-interval", type=_seconds, default=d.short_interval,
                   help=f"seconds between short requests (default {d.short_interval})")
    g = p.add_argument_group("kvmesh's store")
    g.add_argument("--store-host-bytes", type=_bytes, default=d.store_host_bytes,
                   help="host RAM tier (default 256MiB cache-pressure, 512MiB otherwise)")
    g.add_argument("--store-disk-bytes", type=_bytes_or_zero, default=d.store_disk_bytes,
                   help="disk tier, in a temporary directory (default 2GiB cache-pressure, "
                        "0 otherwise: none)")
    g = p.add_argument_group("limits and outputs")
    g.add_argument("--request-timeout", type=_seconds, default=d.request_timeout,
                   help=f"seconds one request may take (default {d.request_timeout:g})")
    g.add_argument("--start-timeout", type=_seconds, default=d.start_timeout,
                   help=f"seconds a system may take to start (default {d.start_timeout:g})")
    g.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG of TTFT and inter-token latency per system and turn")
    g.add_argument("--records", default=None, metavar="PATH",
                   help="write every request's outcome (text, token ids, times, kvmesh breakdown) as JSON")


DESCRIPTION = """\
Runs a kvmesh cluster on this machine (store, prefill, decode, router), then a plain vLLM
OpenAI server, each from empty caches, with the same model, vLLM engine flags, KV cache
size and cores, and sends both the same workload through the OpenAI streaming API with
vLLM's own benchmark request functions (greedy, fixed answer lengths). Prints one JSON
line: per system TTFT per request kind (p50/p90/p99/max), inter-token latency (p50/p99),
output tokens/s and request counts; whether both gave the same text and token ids for
every request; the ratios kvmesh / plain vLLM (only when they did); kvmesh's per-request
breakdown of its slowest follow-up turns (revisits, short requests) and the store's tier
hits. Progress goes to stderr.

Exit status: 0 when every request succeeded and the outputs are identical; 1 otherwise
(the JSON still says what happened); 130 when interrupted."""


def settings_from(args: argparse.Namespace) -> ServeBenchSettings:
    fields = {f.name for f in dataclasses.fields(ServeBenchSettings)}
    return ServeBenchSettings(**{k: v for k, v in vars(args).items() if k in fields})


def main(args: argparse.Namespace) -> None:
    """``kvmesh bench serve``: run, print the JSON line, exit 0/1 (130 when interrupted)."""
    try:
        settings = settings_from(args)
        settings.engine_flag_list()
    except ValueError as e:
        raise SystemExit(f"kvmesh bench serve: {e}") from None

    from kvmesh.cluster.local import ClusterError

    def interrupt(*_):  # the first SIGINT or SIGTERM stops the run; later ones cannot cut the cleanup short
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        report, _ = run(settings)
    except KeyboardInterrupt:
        _say("interrupted; everything it started is stopped")
        raise SystemExit(130) from None
    except (ValueError, serve_systems.StartError, ClusterError) as e:
        raise SystemExit(f"kvmesh bench serve: {e}") from None
    print(json.dumps(report), flush=True)
    if not succeeded(report):
        raise SystemExit(1)
