"""``kvmesh bench router``: what the router adds to a request's latency.

Two stub workers (``bench.stub_worker``: the worker API with no engine) run in a child
process; the router runs in another. The baseline is this process calling the stubs
directly the way the router does (a prefill call, then a decode call); the measured path
is the same request through the router's gRPC API (the SDK) and its HTTP API. The
router's overhead is the difference of the medians.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from kvmesh.bench.stats import percentile


def _serve_stubs(queue) -> None:
    from kvmesh.bench.stub_worker import start_stub

    async def main():
        servers = [await start_stub(role) for role in ("prefill", "decode")]
        queue.put([address for _, address in servers])
        await asyncio.Event().wait()

    asyncio.run(main())


def _percentiles(samples: list[float]) -> dict:
    ms = sorted(x * 1000 for x in samples)
    return {"samples": len(ms), "p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(percentile(ms, 0.99), 3)}


async def _direct(prefill: str, decode: str, prompt: list[int], n: int) -> list[float]:
    from kvmesh_proto import worker_pb2
    from kvmesh.router.workers import WorkerClient

    pre, dec = WorkerClient(prefill), WorkerClient(decode)
    samples = []
    for i in range(n):
        req = worker_pb2.GenerateRequest(request_id=f"d{i}", prompt_token_ids=prompt,
                                         sampling=worker_pb2.SamplingParams(max_tokens=1))
        start = time.perf_counter()
        async for _ in pre.generate(req, 10):
            pass
        req.sampling.max_tokens = 4
        async for _ in dec.generate(req, 10):
            pass
        samples.append(time.perf_counter() - start)
    await pre.close()
    await dec.close()
    return samples


def run(requests: int = 300, progress=None) -> dict:
    from kvmesh.cluster.local import free_port, http_ready
    from kvmesh.cluster.models import ensure_model
    from kvmesh_client import Client

    say = progress or (lambda m: None)
    model = str(ensure_model("tiny"))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    stubs = ctx.Process(target=_serve_stubs, args=(queue,), daemon=True)
    stubs.start()
    router = None
    try:
        prefill, decode = queue.get(timeout=60)
        http_port, grpc_port = free_port(), free_port()
        log = tempfile.TemporaryFile()
        # Prompts long enough (100 tokens) that the router always runs prefill.
        router = subprocess.Popen([sys.executable, "-m", "kvmesh.cluster.cli", "router", "--model", model,
                                   "--port", str(http_port), "--grpc-port", str(grpc_port),
                                   "--prefill", prefill, "--decode", decode],
                                  stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 120
        while not http_ready(url + "/health")():
            if time.monotonic() > deadline or router.poll() is not None:
                log.seek(0)
                raise RuntimeError("router did not start:\n" + log.read().decode(errors="replace")[-2000:])
            time.sleep(0.2)
        prompt = list(range(5, 105))
        say("direct calls to the stub workers")
        asyncio.run(_direct(prefill, decode, prompt, 20))  # warm-up
        direct = asyncio.run(_direct(prefill, decode, prompt, requests))
        say("through the router's gRPC API")
        grpc_samples = []
        with Client(f"127.0.0.1:{grpc_port}") as client:
            for i in range(requests + 20):
                start = time.perf_counter()
                client.generate(prompt, max_tokens=4, temperature=0)
                if i >= 20:
                    grpc_samples.append(time.perf_counter() - start)
        say("through the router's HTTP API")
        http_samples = []
        body = json.dumps({"prompt": prompt, "max_tokens": 4, "temperature": 0}).encode()
        for i in range(requests + 20):
            req = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
            if i >= 20:
                http_samples.append(time.perf_counter() - start)
    finally:  # whatever failed, the router and the stubs stop
        if router is not None:
            router.terminate()
            try:
                router.wait(10)
            except subprocess.TimeoutExpired:
                router.kill()
                router.wait()
        stubs.terminate()
        stubs.join(10)
        if stubs.is_alive():
            stubs.kill()
            stubs.join()
    base = _percentiles(direct)
    results = []
    for api, samples in (("grpc", grpc_samples), ("http", http_samples)):
        p = _percentiles(samples)
        results.append({"api": api, **p, "added_p50_ms": round(p["p50_ms"] - base["p50_ms"], 3)})
    return {"ceiling": {"direct_to_workers": base}, "results": results,
            "config": {"requests": requests, "prompt_tokens": len(prompt), "max_tokens": 4}}


def main(as_json: bool, requests: int) -> None:
    progress = None if as_json else (lambda m: print(f"kvmesh bench: {m}", file=sys.stderr, flush=True))
    report = run(requests, progress)
    if as_json:
        print(json.dumps(report))
        return
    base = report["ceiling"]["direct_to_workers"]
    print(f"direct to the workers: p50 {base['p50_ms']} ms, p99 {base['p99_ms']} ms")
    for r in report["results"]:
        print(f"via router {r['api']:4}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
              f"added at the median {r['added_p50_ms']} ms")
