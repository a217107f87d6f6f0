"""``kvmesh bench layerwise``: how much of a decode worker's KV load hides behind compute.

A cluster on this machine serves long prompts (prefill, then decode with every prompt
block loaded from the store, layer by layer); for each request the decode worker reports
how long the transfer took (lease to last layer's bytes) and how long its forward pass
waited for bytes. The hidden share is ``1 - waited / transfer`` — the transfer's own
duration, measured in the same request, is the reference. Before timing, untimed
requests go round until every decode worker has served one, so that no backend's
figures carry a worker's first-request costs (connections, registrations, the engine's
first steps).
"""

from __future__ import annotations

import json
import random
import statistics
import sys

import httpx


def run(size: str = "bench", prompts: int = 6, prompt_tokens: int = 2000,
        backends: tuple[str, ...] = ("shm", "nixl", "grpc"), progress=None) -> dict:
    from kvmesh.cluster.local import LocalCluster
    from kvmesh.cluster.models import ensure_model

    say = progress or (lambda m: None)
    model_dir = ensure_model(size)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    results = []
    with LocalCluster(model=str(model_dir), served_model_name=size, decode_workers=len(backends),
                      decode_worker_args=tuple(("--transfer-preference", b) for b in backends),
                      router_args=("--routing", "round_robin"),
                      verbose=progress is not None) as cluster:
        def complete(prompt: list[int]) -> dict:
            r = httpx.post(cluster.router_url + "/v1/completions", timeout=600, json={
                "prompt": prompt, "max_tokens": 4, "temperature": 0}).json()
            return r["kvmesh"]["kv_transfer"]

        say(f"warm-up: untimed requests until every decode worker ({', '.join(backends)}) "
            "has served one")
        warm_rng = random.Random(1)  # prompts of their own: the timed ones stay as they were
        warmed: set = set()
        for _ in range(3 * len(backends)):  # round robin: one round is enough unless a load failed
            prompt = [warm_rng.randrange(10, vocab) for _ in range(prompt_tokens)]
            warmed.add(complete(prompt).get("backend"))
            if warmed >= set(backends):
                break
        for backend in backends:
            say(f"{backend}: {prompts} prompts of {prompt_tokens} tokens")
            rows = []
            for _ in range(prompts * len(backends)):  # round robin: every worker gets some
                info = complete([rng.randrange(10, vocab) for _ in range(prompt_tokens)])
                if info["backend"] == backend and info["seconds"] > 0:
                    rows.append(info)
                if len(rows) >= prompts:
                    break
            hidden = [1 - x["waited_s"] / x["seconds"] for x in rows]
            results.append({
                "backend": backend, "requests": len(rows),
                "kv_bytes": rows[0]["bytes"] if rows else 0,
                "transfer_ms_p50": round(statistics.median(x["seconds"] for x in rows) * 1e3, 2) if rows else None,
                "waited_ms_p50": round(statistics.median(x["waited_s"] for x in rows) * 1e3, 2) if rows else None,
                "hidden_share_p50": round(statistics.median(hidden), 3) if rows else None})
    return {"results": results, "config": {"model": size, "prompt_tokens": prompt_tokens,
                                           "warmed_up": sorted(b for b in warmed if b)}}


def main(as_json: bool, size: str) -> None:
    progress = None if as_json else (lambda m: print(f"kvmesh bench: {m}", file=sys.stderr, flush=True))
    report = run(size, progress=progress)
    if as_json:
        print(json.dumps(report))
        return
    for r in report["results"]:
        print(f"{r['backend']:5} {r['requests']} requests, {r['kv_bytes']} bytes each: transfer "
              f"{r['transfer_ms_p50']} ms, forward waited {r['waited_ms_p50']} ms, "
              f"hidden {r['hidden_share_p50']}")
