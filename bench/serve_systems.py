"""The two systems ``kvmesh bench serve`` compares, started from the same engine arguments.

* **kvmesh**: a ``LocalCluster`` (store, prefill worker, decode worker, router) on this
  machine. Its engines share the machine's cores: prefill the first half, decode the rest.
* **plain vLLM**: one ``python -m vllm.entrypoints.openai.api_server`` on the same cores
  (on a CPU, its engine computes on one core and its API server runs on the other).

Both get the same model, the same list of vLLM engine flags (``engine_flags``), the same
``VLLM_CPU_KVCACHE_SPACE`` and ``VLLM_ENABLE_V1_MULTIPROCESSING`` (``engine_env``), and
start with empty caches. The plain server also gets what kvmesh's workers default to
where vLLM's defaults differ (eager mode: ``engine_host.engine_args.KVMESH_DEFAULTS``;
vLLM's prefix cache stays on, as plain vLLM users run it, while kvmesh's store is its
prefix cache) and vLLM's own sampling defaults instead of the model's generation config
(kvmesh's workers take only the request's).

Each ``start_*`` is a context manager: whatever it started is stopped when it exits,
on an error or Ctrl-C too, and every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from kvmesh.kv_store.malloc_tuning import MALLOC_ENV

# What kvmesh's workers always run with, given to the plain server as flags.
PLAIN_VLLM_FIXED_FLAGS = ("--enforce-eager", "--generation-config", "vllm",
                          "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning")


class StartError(RuntimeError):
    """A system under test did not start or stopped answering."""


@dataclass(frozen=True)
class Endpoint:
    name: str                           # "kvmesh" or "vllm"
    url: str                            # http://host:port, the OpenAI API under /v1
    model: str                          # the served model name
    store_metrics_url: str | None = None  # kvmesh only
    log_dir: str = ""


def parse_flags(flags: list[str]) -> dict[str, str | None]:
    """``["--a", "1", "--b=2", "--c"]`` -> ``{"--a": "1", "--b": "2", "--c": None}`` (None: a
    switch). ValueError for anything that is not a ``--flag``."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(flags):
        token = flags[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"engine arguments must be --flags (with values); got {token!r}")
        if "=" in token:
            name, value = token.split("=", 1)
            out[name] = value
        elif i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            out[token], i = flags[i + 1], i + 1
        else:
            out[token] = None
        i += 1
    return out


def flag_int(flags: list[str], name: str, default: int | None = None) -> int | None:
    """The whole-number value of ``name`` in ``flags`` (``default`` when absent)."""
    value = parse_flags(flags).get(name, default)
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} takes a whole number, not {value!r}") from None


def kvmesh_engine_options(flags: list[str]) -> dict:
    """``LocalCluster`` options that give kvmesh's workers the engine arguments ``flags``
    (vLLM's own flags) give a plain vLLM server: ``block_size`` (the router hashes blocks of
    that size too) and ``worker_args`` (every other flag: the workers pass vLLM's flags to
    their engines). ValueError (``EngineArgsError``) for a flag vLLM's parser rejects or
    kvmesh must own, in either role, before anything starts."""
    from kvmesh.engine_host.engine_args import check_engine_args

    block_size = flag_int(flags, "--block-size", 32)
    args: list[str] = []
    for name, value in parse_flags(flags).items():
        if name != "--block-size":
            args += [name] if value is None else [name, value]
    for role in ("prefill", "decode"):
        # (the check reads no model files: any name stands for the model here)
        check_engine_args(["--model", "model", "--block-size", str(block_size), *args], role)
    return {"block_size": block_size, "worker_args": tuple(args)}


def engine_env(kv_cache_gib: int, multiprocessing: bool) -> dict[str, str]:
    """The vLLM environment both systems start with."""
    if kv_cache_gib < 1:
        raise ValueError("the KV cache size is a whole number of GiB, at least 1")
    return {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocessing else "0",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, restored afterwards (LocalCluster's components
    inherit this process's environment)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def start_kvmesh(model: str, name: str, flags: list[str], env: dict[str, str], *,
                 store_host_bytes: int = 512 << 20, store_disk_bytes: int = 0,
                 start_timeout_s: float = 600.0, run_dir: str | None = None,
                 say: Callable[[str], None] = lambda m: None) -> Iterator[Endpoint]:
    """A kvmesh cluster serving ``model`` as ``name``; stopped on exit."""
    from kvmesh.cluster.local import LocalCluster

    options = kvmesh_engine_options(flags)
    store_args = ("--disk-bytes", str(store_disk_bytes)) if store_disk_bytes else ()
    with _environment(env):
        cluster = LocalCluster(model=model, served_model_name=name, store_capacity_bytes=store_host_bytes,
                               store_args=store_args, start_timeout_s=start_timeout_s,
                               run_dir=run_dir, verbose=False, **options)
        say(f"kvmesh: starting store, prefill, decode and router (logs in {cluster.run_dir})")
        with cluster:
            yield Endpoint("kvmesh", cluster.router_url, name, cluster.store_metrics_url,
                           str(cluster.run_dir))


def plain_vllm_command(model: str, name: str, host: str, port: int, flags: list[str]) -> list[str]:
    """The plain vLLM OpenAI server's command line (``vllm`` the console command needs a
    distribution named ``vllm``; the module works whatever the distribution's name)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--served-model-name", name, "--host", host, "--port", str(port),
            *PLAIN_VLLM_FIXED_FLAGS, *flags]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark's process ends, killed too."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def start_plain_vllm(model: str, name: str, flags: list[str], env: dict[str, str], *,
                     host: str = "127.0.0.1", start_timeout_s: float = 600.0,
                     run_dir: str | None = None, stop_timeout_s: float = 20.0,
                     say: Callable[[str], None] = lambda m: None) -> Iterator[Endpoint]:
    """A plain vLLM OpenAI server serving ``model`` as ``name``: in a process group of its
    own (stopping it reaches its engine processes), its output in ``vllm.log``. Ready when
    ``/v1/models`` answers; ``StartError`` with the log's end if it exits first or is
    not ready within ``start_timeout_s``. Stopped (SIGTERM, then SIGKILL to the group
    after ``stop_timeout_s``) on exit."""
    from kvmesh.cluster.local import free_port

    log_dir = Path(run_dir or tempfile.mkdtemp(prefix="kvmesh-bench-vllm-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "vllm.log"
    port = free_port(host)
    command = plain_vllm_command(model, name, host, port, flags)
    full_env = dict(MALLOC_ENV, **os.environ)
    full_env.update(env, PYTHONUNBUFFERED="1")
    say(f"vllm: starting the plain vLLM server (log in {log_path})")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=full_env, process_group=0, preexec_fn=_die_with_parent)
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _http_ok(url + "/v1/models"):
            if proc.poll() is not None:
                raise StartError(f"the plain vLLM server exited with code {proc.returncode} while "
                                   f"starting; end of {log_path}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise StartError(f"the plain vLLM server was not ready after {start_timeout_s:.0f} s; "
                                   f"end of {log_path}:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield Endpoint("vllm", url, name, None, str(log_dir))
    finally:
        _stop_group(proc, stop_timeout_s)


def _stop_group(proc: subprocess.Popen, timeout_s: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):  # its engine processes too
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _cause(path: Path) -> str:
    """": <the log's last error line that is not a pointer to an earlier one>", or "" when none."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if re.match(r"^\s*\w*(Error|Exception): ", line)
              and "root cause above" not in line]
    return f": {errors[-1].strip()}" if errors else ""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
    except OSError:
        return ""


def store_metrics(url: str | None) -> dict | None:
    """The store's tier figures from its Prometheus endpoint: per tier hits, promotions,
    demotions, evictions, blocks and used bytes; store-wide misses and puts. None when
    there is no endpoint or it does not answer."""
    if not url:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5.0) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    tiers: dict[str, dict] = {}
    totals: dict[str, float] = {}
    wanted = {"hits", "promotions", "demotions", "evictions", "blocks", "used_bytes", "read_bytes"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("kvmesh_store_").removesuffix("_total")
            tier = sample.labels.get("tier")
            if tier and name in wanted:
                tiers.setdefault(tier, {})[name] = int(sample.value)
            elif not tier and name in ("misses", "puts", "corrupt", "rejected"):
                totals[name] = int(sample.value)
    return {"tiers": tiers, **totals}
