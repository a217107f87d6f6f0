"""``kvmesh demo``: sample prompts through a running cluster, with what each one cost."""

from __future__ import annotations

import json
import urllib.request

SHARED_PREFIX = (
    "You are the operations assistant of a cluster that serves language models. "
    "Prefill workers compute the key and value cache of each prompt, a store keeps it in "
    "host memory, and decode workers load it to generate tokens. Answer briefly. "
) * 6

PROMPTS = [
    ("short", "The quick brown fox"),
    ("shared prefix #1", SHARED_PREFIX + "Question one: why split prefill and decode?"),
    ("shared prefix #2", SHARED_PREFIX + "Question two: what does the store hold?"),
    ("shared prefix #3", SHARED_PREFIX + "Question three: what happens when a block is lost?"),
    ("other long", "Tokens stream back through the router to the client. " * 12),
    ("other long, again", "Tokens stream back through the router to the client. " * 12),
]


def post(url: str, body: dict, timeout_s: float = 120.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def run_demo(cluster, max_tokens: int = 24) -> list[dict]:
    """Send ``PROMPTS`` one by one (greedy) and print each result; returns the responses."""
    url = cluster.router_url + "/v1/completions"
    results = []
    print(f"\nkvmesh demo: {len(PROMPTS)} prompts through {cluster.router_url}\n", flush=True)
    for label, prompt in PROMPTS:
        r = post(url, {"model": cluster.served_model_name, "prompt": prompt,
                       "max_tokens": max_tokens, "temperature": 0})
        info = r["kvmesh"]
        from_store = info["prefix_tokens_from_store"]
        prefill = "skipped" if info["prefill_skipped"] else f"{from_store['prefill']} tokens"
        print(f"[{label}] prompt {r['usage']['prompt_tokens']} tokens, "
              f"time to first token {info['ttft_s'] * 1000:.0f} ms, "
              f"from store: prefill {prefill}, decode {from_store['decode']} tokens",
              flush=True)
        print(f"    -> {r['choices'][0]['text']!r}", flush=True)
        results.append(r)
    return results
