"""``kvmesh bench families``: per model family, the KV a prompt moves through the store,
and the decode worker's time to first token with a store hit against recomputing.

For each family (the generated test models: ``tiny`` grouped-query, ``mqa`` one KV head,
``mha`` a KV head per attention head, ``sliding`` every layer windowed, ``hybrid``
local and global layers; and ``draft``: tiny with speculative decoding by the ``draft``
model on both workers, whose KV goes through the store beside tiny's) one cluster on
this machine serves the same prompts twice,
under two cache salts so that neither run finds the other's blocks:

* **recompute**: through a second router whose ``--max-local-prefill-tokens`` covers the
  whole prompt, so every prompt skips prefill and the decode worker computes it;
* **store hit**: through the cluster's own router (the prompt is over its local limit), so
  the prefill worker computes and saves it and the decode worker loads it.

Both runs are greedy; their outputs must be identical, else no ratio is reported. Per
family the report gives the bytes the decode worker loaded per prompt token, the prompt
tokens it loaded, and the medians of its own time to first token (its engine queue and
first step, the load included) in each run, with their ratio (hit / recompute): the
reference is recomputation, measured in the same cluster. Decode workers run without
vLLM's local prefix cache, so that neither run is served from it.
"""

from __future__ import annotations

import json
import random
import statistics
import sys

import httpx

FAMILIES = ("tiny", "mqa", "mha", "sliding", "hybrid", "draft")
DRAFT_TOKENS = 3  # the draft row's speculative tokens per step
MODES = ("recompute", "hit")


def _family(size: str, prompts: list[list[int]], max_tokens: int, say) -> dict:
    """One cluster of ``size``: each prompt recomputed, then loaded; the family's row."""
    from kvmesh.bench.load_path_report import median_ms, sample
    from kvmesh.cluster.local import LocalCluster
    from kvmesh.cluster.models import ensure_model

    limit = max(len(p) for p in prompts) + 1
    model, worker_args = str(ensure_model(size)), ()
    if size == "draft":  # tiny, drafted for by the draft model on both workers
        draft, model = model, str(ensure_model("tiny"))
        worker_args = ("--speculative-config", json.dumps(
            {"method": "draft_model", "model": draft, "num_speculative_tokens": DRAFT_TOKENS}))
    with LocalCluster(model=model, served_model_name=size, worker_args=worker_args,
                      decode_local_cache=False, verbose=False) as cluster:
        urls = {"hit": cluster.router_url,
                "recompute": cluster.add_router("recompute", "--max-local-prefill-tokens", str(limit))[0]}

        def complete(mode: str, prompt: list[int], salt: str) -> dict:
            r = httpx.post(urls[mode] + "/v1/completions", timeout=600, json={
                "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True, "cache_salt": salt})
            r.raise_for_status()
            body = r.json()
            return {"tokens": body["choices"][0]["token_ids"], "info": body["kvmesh"]}

        for mode in MODES:  # untimed: each path's first-request costs
            complete(mode, prompts[0], f"warm-{mode}")
        runs = {mode: [] for mode in MODES}
        for mode in MODES:
            say(f"{size}: {len(prompts)} prompts, {mode}")
            runs[mode] = [complete(mode, p, mode) for p in prompts[1:]]
    samples = {m: [sample(r["info"]) for r in runs[m]] for m in MODES}
    loaded = [r["info"]["prefix_tokens_from_store"]["decode"] for r in runs["hit"]]
    loaded_when_recomputing = [r["info"]["prefix_tokens_from_store"]["decode"] for r in runs["recompute"]]
    identical = all(a["tokens"] == b["tokens"] for a, b in zip(runs["recompute"], runs["hit"]))
    prompt_tokens = len(prompts[1])
    bytes_moved = statistics.median(s["bytes"] for s in samples["hit"])
    ttft = {m: median_ms([s["decode_ttft_s"] for s in samples[m]]) for m in MODES}
    return {
        "family": size, "prompt_tokens": prompt_tokens, "requests": len(prompts) - 1,
        "outputs_identical": identical,
        "tokens_loaded_p50": statistics.median(loaded),
        "recompute_tokens_loaded_max": max(loaded_when_recomputing),
        "kv_bytes_p50": bytes_moved,
        "kv_bytes_per_prompt_token": round(bytes_moved / prompt_tokens, 1),
        "decode_ttft_ms_p50": ttft,
        "ttft_ratio_hit_to_recompute": (round(ttft["hit"] / ttft["recompute"], 3)
                                        if identical and ttft["hit"] and ttft["recompute"] else None),
    }


def run(families: tuple[str, ...] = FAMILIES, prompts: int = 4, prompt_tokens: int = 1000,
        max_tokens: int = 4, progress=None) -> dict:
    """Every family's row; raises ``ValueError`` for a family that is not a generated
    model of the tiny tokenizer."""
    from kvmesh.cluster.models import SIZES

    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown model family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    say = progress or (lambda m: None)
    vocab = SIZES["tiny"].vocab_size  # every family shares tiny's tokenizer
    rng = random.Random(0)
    texts = [[rng.randrange(10, vocab) for _ in range(prompt_tokens)] for _ in range(prompts + 1)]
    rows = [_family(f, texts, max_tokens, say) for f in families]
    return {"benchmark": "families", "results": rows,
            "config": {"prompt_tokens": prompt_tokens, "prompts": prompts, "max_tokens": max_tokens},
            "outputs_identical": all(r["outputs_identical"] for r in rows)}


def main(as_json: bool, families: tuple[str, ...], prompts: int, prompt_tokens: int) -> None:
    progress = None if as_json else (lambda m: print(f"kvmesh bench: {m}", file=sys.stderr, flush=True))
    report = run(families, prompts=prompts, prompt_tokens=prompt_tokens, progress=progress)
    if as_json:
        print(json.dumps(report))
    else:
        for r in report["results"]:
            t = r["decode_ttft_ms_p50"]
            print(f"{r['family']:8} {r['kv_bytes_per_prompt_token']} KV bytes per prompt token, "
                  f"{r['tokens_loaded_p50']} of {r['prompt_tokens']} tokens loaded; decode TTFT "
                  f"hit {t['hit']} ms vs recompute {t['recompute']} ms: "
                  f"{r['ttft_ratio_hit_to_recompute']}")
    if not report["outputs_identical"]:
        print("kvmesh bench families: outputs differ between the runs; no ratio reported", file=sys.stderr)
        sys.exit(1)
