"""A session resumed from disk against the same prompt recomputed, on the bench model.

``python -m kvmesh.bench.sessions_bench [--prompt-tokens 2048] [--one-offs 6]`` prints
one JSON line.

One cluster on this machine (the bench model; a store whose host RAM holds one and a
half prompts' KV over a disk tier holding four; decode workers without vLLM's local
prefix cache; prefill skipped, so the decode worker itself loads or computes each
prompt). Two prompts of the same length are served once, one naming a session, one
not; the session goes idle past its TTL while ``--one-offs`` other prompts, more than
both tiers hold, come and go; then both prompts come again. The session's prompt is
loaded from disk; the other was evicted and is recomputed: the baseline, in the same
run. Reported: the decode side's time to first token of each (the decode worker's
engine queue and first step, the load included, and the router's whole time to first
token), their ratio (resumed / recomputed), the store's disk hits during the resume,
and whether each second answer equals its first (greedy; no ratio is reported if not).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import time

import httpx

BLOCK = 32
TTL_S = 1.0


def _disk_hits(url: str) -> float:
    m = re.search(r'^kvmesh_store_hits_total\{tier="disk"\} (\S+)$', httpx.get(url, timeout=10).text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def measure(prompt_tokens: int, one_offs: int, max_tokens: int, seed: int) -> dict:
    from kvmesh.cluster.local import LocalCluster
    from kvmesh.cluster.models import SIZES, ensure_model

    spec = SIZES["bench"]
    kv_per_token = 2 * spec.num_kv_heads * (spec.hidden_size // spec.num_heads) * 2 * spec.num_layers
    prompt_bytes = kv_per_token * prompt_tokens
    rng = random.Random(seed)
    # token ids below 1000: within the bench model's tokenizer (1,831 tokens)
    warm, session, plain, *others = [[rng.randrange(10, 1000) for _ in range(prompt_tokens)]
                                     for _ in range(3 + one_offs)]
    store_args = ("--disk-bytes", str(4 * prompt_bytes), "--session-ttl", str(TTL_S))
    with LocalCluster(model=str(ensure_model("bench")), served_model_name="bench", block_size=BLOCK,
                      store_capacity_bytes=prompt_bytes * 3 // 2, store_args=store_args,
                      router_args=("--max-local-prefill-tokens", str(prompt_tokens + 1)),
                      decode_local_cache=False, verbose=False) as cluster:

        def complete(prompt: list[int], **extra) -> dict:
            r = httpx.post(cluster.router_url + "/v1/completions", timeout=600, json={
                "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True, **extra})
            r.raise_for_status()
            return r.json()

        chat = {"kvmesh": {"session": "chat"}}
        complete(warm)  # untimed: the first request's costs
        first = {"session": complete(session, **chat), "plain": complete(plain)}
        time.sleep(TTL_S * 1.5)  # the session goes idle
        for prompt in others:
            complete(prompt)
        held = httpx.post(cluster.router_url + "/v1/sessions/lookup", json={"session": "chat"}, timeout=10).json()
        before = _disk_hits(cluster.store_metrics_url)
        again = {"session": complete(session, **chat)}
        disk_hits = _disk_hits(cluster.store_metrics_url) - before
        again["plain"] = complete(plain)

    same = all(first[k]["choices"][0]["token_ids"] == again[k]["choices"][0]["token_ids"] for k in first)
    decode_ttft = {k: again[k]["kvmesh"]["breakdown"]["decode_engine_queue"]
                   + again[k]["kvmesh"]["breakdown"]["decode_first_step"] for k in again}
    ttft = {k: again[k]["kvmesh"]["ttft_s"] for k in again}
    out = {"bench": "sessions", "model": "bench", "prompt_tokens": prompt_tokens, "one_offs": one_offs,
           "prompt_kv_bytes": prompt_bytes, "host_bytes": prompt_bytes * 3 // 2, "disk_bytes": 4 * prompt_bytes,
           "session_before_resume": held, "disk_hits_during_resume": disk_hits,
           "tokens_from_store": {k: again[k]["kvmesh"]["prefix_tokens_from_store"]["decode"] for k in again},
           "outputs_equal": same,
           "decode_ttft_s": {k: round(v, 4) for k, v in decode_ttft.items()},
           "ttft_s": {k: round(v, 4) for k, v in ttft.items()},
           "machine": f"{platform.machine()} {platform.processor()}".strip(), "seed": seed}
    if same:
        out["decode_ttft_ratio"] = round(decode_ttft["session"] / decode_ttft["plain"], 3)
        out["ttft_ratio"] = round(ttft["session"] / ttft["plain"], 3)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kvmesh.bench.sessions_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--one-offs", type=int, default=6, help="prompts of other traffic while the session is idle")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.prompt_tokens, a.one_offs, a.max_tokens, a.seed)))


if __name__ == "__main__":
    main()
