"""``kvmesh bench routing``: time to first token with KV-aware routing vs. round robin.

One cluster (a prefill worker, two decode workers keeping vLLM's local prefix cache)
serves the same workload through two routers over the same workers: the KV-aware one and
a cache-blind round-robin one (the baseline). The workload is groups of requests sharing
a long prefix, interleaved across groups, sent one at a time; each policy gets prefixes
of its own (so neither finds the other's), and the policies take turns over two rounds.
Before timing, a few untimed requests (prefixes no timed request shares) go through
each router, so that the cluster's first-request costs (connections, the engines' first
steps) fall on neither policy's figures. Reported: time to first token as the client
sees it (streaming), per policy, and the ratios KV-aware / round robin of the medians
(p50, which a few slow requests do not move) and of the means.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time

import httpx

from kvmesh.bench.stats import percentile

WARMUP_SEED = 1000  # warm-up prompts: seeds the timed workload (1, 2, ...) never uses


def _workload(seed: int, prefixes: int, per_prefix: int, prefix_tokens: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    heads = [[rng.randrange(10, vocab) for _ in range(prefix_tokens)] for _ in range(prefixes)]
    return [heads[p] + [rng.randrange(10, vocab) for _ in range(16)]
            for _ in range(per_prefix) for p in range(prefixes)]


def _ttft(url: str, prompt: list[int]) -> float:
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("no token came back")
    return first


def run(size: str = "tiny", prefixes: int = 4, per_prefix: int = 4, prefix_tokens: int = 480,
        warmup: int = 4, progress=None) -> dict:
    from kvmesh.cluster.local import LocalCluster
    from kvmesh.cluster.models import ensure_model

    say = progress or (lambda m: None)
    model = str(ensure_model(size))
    vocab = json.loads((ensure_model(size) / "config.json").read_text())["vocab_size"]
    samples: dict[str, list[float]] = {"kv_aware": [], "round_robin": []}
    with LocalCluster(model=model, served_model_name=size, decode_workers=2,
                      decode_local_cache=True, verbose=progress is not None) as cluster:
        urls = {"kv_aware": cluster.router_url,
                "round_robin": cluster.add_router("router-rr", "--routing", "round_robin",
                                                  "--decode-local-cache")[0]}
        say(f"warm-up: {warmup} untimed requests through each router")
        for i, policy in enumerate(urls):
            for prompt in _workload(WARMUP_SEED + i, warmup, 1, prefix_tokens, vocab):
                _ttft(urls[policy], prompt)
        seed = 0
        for round_ in range(2):
            for policy in (("kv_aware", "round_robin") if round_ == 0 else ("round_robin", "kv_aware")):
                seed += 1
                say(f"round {round_ + 1}: {policy}")
                for prompt in _workload(seed, prefixes, per_prefix, prefix_tokens, vocab):
                    samples[policy].append(_ttft(urls[policy], prompt))
    results = []
    for policy, xs in samples.items():
        ms = sorted(x * 1000 for x in xs)
        results.append({"policy": policy, "requests": len(ms), "mean_ttft_ms": round(statistics.mean(ms), 2),
                        "p50_ttft_ms": round(statistics.median(ms), 2),
                        "p90_ttft_ms": round(percentile(ms, 0.9), 2)})
    by = {r["policy"]: r for r in results}
    return {"baseline": "round_robin", "results": results,
            "ratio_p50_ttft_kv_aware_to_round_robin": round(
                by["kv_aware"]["p50_ttft_ms"] / by["round_robin"]["p50_ttft_ms"], 3),
            "ratio_mean_ttft_kv_aware_to_round_robin": round(
                by["kv_aware"]["mean_ttft_ms"] / by["round_robin"]["mean_ttft_ms"], 3),
            "config": {"model": size, "prefixes": prefixes, "per_prefix": per_prefix,
                       "prefix_tokens": prefix_tokens, "suffix_tokens": 16,
                       "warmup_requests_per_router": warmup}}


def main(as_json: bool, size: str) -> None:
    progress = None if as_json else (lambda m: print(f"kvmesh bench: {m}", file=sys.stderr, flush=True))
    report = run(size, progress=progress)
    if as_json:
        print(json.dumps(report))
        return
    for r in report["results"]:
        print(f"{r['policy']:12} mean TTFT {r['mean_ttft_ms']} ms, p50 {r['p50_ttft_ms']} ms, "
              f"p90 {r['p90_ttft_ms']} ms over {r['requests']} requests")
    print(f"KV-aware / round robin: p50 TTFT {report['ratio_p50_ttft_kv_aware_to_round_robin']}, "
          f"mean TTFT {report['ratio_mean_ttft_kv_aware_to_round_robin']}")
