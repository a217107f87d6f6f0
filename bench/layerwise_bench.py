"""``kvmesh bench layerwise``: a decode worker's KV load path, and how much of it hides
behind compute.

A cluster on this machine serves long prompts (prefill, then decode with every prompt
block loaded from the store); it runs twice on the same prompts, once with each load
mode of the decode workers: layer by layer (each layer's KV waited for just before its
attention) and everything first (``--no-layerwise``: the forward pass starts once every
layer is in the paged cache). Each response says, from its decode worker: the bytes
loaded, the transfer (lease to the last layer's bytes, verified), how long the forward
pass waited for bytes, and the load path: the store lookup plus the lease to the last
block copied into the paged cache, with its parts (lookup, locate, read, verify, copy).

Per backend the report gives the load path of the load-everything-first requests (where
no compute runs inside it) as time, GB/s and ratio to a memcpy of the same number of
bytes timed in the same run (``bench.load_path_report``); the hidden share of the
layer-wise requests (``1 - waited / transfer``); and the time to first token of each
mode, end to end and on the decode worker, with their ratio. Before timing, untimed
requests go round until every decode worker has served one, so that no backend's
figures carry a worker's first-request costs.
"""

from __future__ import annotations

import json
import random
import sys

import httpx

from kvmesh.bench.load_path_report import MODES, memcpy_seconds, sample, summarize


def _serve(model_dir, size: str, backends: tuple[str, ...], layerwise: bool, prompts: list[list[int]],
           warm_prompts: list[list[int]], say) -> list[dict]:
    """One cluster, decode workers in one load mode (one worker per backend, round robin):
    the warm-up, then ``prompts``; the samples of the timed requests."""
    from kvmesh.cluster.local import LocalCluster

    mode_flag = () if layerwise else ("--no-layerwise",)
    with LocalCluster(model=str(model_dir), served_model_name=size, decode_workers=len(backends),
                      decode_worker_args=tuple(("--transfer-preference", b, *mode_flag) for b in backends),
                      router_args=("--routing", "round_robin"), verbose=False) as cluster:
        def complete(prompt: list[int]) -> dict:
            r = httpx.post(cluster.router_url + "/v1/completions", timeout=600, json={
                "prompt": prompt, "max_tokens": 4, "temperature": 0}).json()
            return sample(r["kvmesh"])

        warmed: set = set()
        for prompt in warm_prompts:  # round robin: one round is enough unless a load failed
            warmed.add(complete(prompt)["backend"])
            if warmed >= set(backends):
                break
        say(f"warmed up: {', '.join(sorted(b for b in warmed if b))}; {len(prompts)} timed requests")
        return [complete(p) for p in prompts]


def run(size: str = "bench", prompts: int = 6, prompt_tokens: int = 2000,
        backends: tuple[str, ...] = ("shm", "nixl", "grpc"), progress=None) -> dict:
    from kvmesh.cluster.models import ensure_model

    say = progress or (lambda m: None)
    model_dir = ensure_model(size)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng, warm_rng = random.Random(0), random.Random(1)  # warm-up prompts of their own
    timed = [[rng.randrange(10, vocab) for _ in range(prompt_tokens)] for _ in range(prompts * len(backends))]
    warm = [[warm_rng.randrange(10, vocab) for _ in range(prompt_tokens)] for _ in range(3 * len(backends))]
    samples: dict[str, list[dict]] = {}
    for mode in MODES:
        say(f"{mode}: a cluster with decode workers over {', '.join(backends)}")
        samples[mode] = _serve(model_dir, size, backends, mode == "layerwise", timed, warm, say)
    loaded = [s for rows in samples.values() for s in rows if s["transfer_s"] > 0]
    nbytes = sorted(s["bytes"] for s in loaded)[len(loaded) // 2] if loaded else 0
    memcpy_s = memcpy_seconds(nbytes) if nbytes else 0.0
    results = [summarize(b, {m: [s for s in samples[m] if s["backend"] == b and s["transfer_s"] > 0]
                             for m in MODES}, memcpy_s) for b in backends]
    return {"results": results,
            "config": {"model": size, "prompt_tokens": prompt_tokens, "prompts_per_backend": prompts,
                       "memcpy": {"bytes": nbytes, "ms": round(memcpy_s * 1e3, 3)}}}


def main(as_json: bool, size: str, prompts: int = 6, backends: tuple[str, ...] = ("shm", "nixl", "grpc")) -> None:
    progress = None if as_json else (lambda m: print(f"kvmesh bench: {m}", file=sys.stderr, flush=True))
    report = run(size, prompts=prompts, backends=backends, progress=progress)
    if as_json:
        print(json.dumps(report))
        return
    for r in report["results"]:
        path, lw, la = r["load_path"], r["layerwise"], r["load_all"]
        print(f"{r['backend']:5} {r['kv_bytes']} bytes: load path {path['ms_p50']} ms = {path['GBps']} GB/s, "
              f"{path['ratio_to_memcpy']}x memcpy ({path['memcpy_GBps']} GB/s); parts {path['parts_ms_p50']}")
        print(f"      layer-wise: transfer {lw['transfer_ms_p50']} ms, forward waited {lw['waited_ms_p50']} ms, "
              f"hidden {lw['hidden_share_p50']}; TTFT {lw['ttft_ms_p50']} ms (decode {lw['decode_ttft_ms_p50']}) "
              f"vs load-all {la['ttft_ms_p50']} ms (decode {la['decode_ttft_ms_p50']}): "
              f"ratio {r['ttft_ratio_layerwise_to_load_all']} (decode {r['decode_ttft_ratio_layerwise_to_load_all']})")
