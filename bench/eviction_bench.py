"""``kvmesh bench eviction``: which eviction policy serves which workload best.

Three request traces are generated from a seed (``TRACES``): multi-turn chat (sessions
that come back with their whole conversation so far, many at once), shared-prefix RAG
(a system prompt and documents of a corpus drawn by popularity, then a question) and a
scan-heavy mix (a reused set of prompt templates between long one-off documents). Each
request is a chain of blocks, keyed by chain hash as the workers key them.

Every trace is replayed against every policy at several capacities, through the store
itself: a ``TieredStore`` over a host tier of that many block slots, with the policy
named, asked as a decode worker asks it (``lookup`` of the prompt's blocks, ``get_many``
of the prefix it holds, then a ``put`` of each block it lacked, naming its parent), so the
policies run under the store's own rules (a parent outlives its children). A block
counts as a hit when the prefix lookup served it; every other block is recomputed.

The ceiling, measured on the same trace in the same run, is the hit ratio of a store
that never evicts (every block seen before is a hit); each result names its ratio to it
(``of_ceiling``) and its recomputed bytes relative to LRU's at the same capacity. The
winner of a trace has the highest hit ratio averaged over the capacities.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import statistics
import sys
import time
from typing import Callable, Sequence

from kvmesh.kv_store.eviction import POLICIES  # light: the command line imports this module

Request = list[int]  # block contents (ids): two requests share a prefix where their lists do
SYSTEM_BLOCKS = 4  # the system prompt every request of a trace starts with
MIN_SLOT = 4096


class _Ids:
    """Fresh block contents, never seen before."""

    def __init__(self, start: int = 1 << 20) -> None:
        self.next = start

    def take(self, n: int) -> list[int]:
        self.next += n
        return list(range(self.next - n, self.next))


def multi_turn_chat(rng: random.Random, requests: int) -> list[Request]:
    """``sessions`` conversations open at once, each request one turn of a random open
    one: the system prompt, the conversation so far (its earlier prompts and the
    replies to them) and 1-3 new blocks; a conversation ends after 2-12 turns and a new
    one opens. Conversations are capped at 96 blocks."""
    ids, sessions = _Ids(), 32
    system = list(range(SYSTEM_BLOCKS))

    def opened() -> dict:
        return {"history": [], "turns": rng.randint(2, 12)}

    open_ = [opened() for _ in range(sessions)]
    out = []
    for _ in range(requests):
        i = rng.randrange(sessions)
        s = open_[i]
        prompt = s["history"] + ids.take(rng.randint(1, 3))
        out.append(system + prompt)
        s["history"] = (prompt + ids.take(rng.randint(1, 2)))[:96]  # the reply joins it
        s["turns"] -= 1
        if s["turns"] == 0:
            open_[i] = opened()
    return out


def _zipf(rng: random.Random, n: int, s: float = 1.1) -> Callable[[], int]:
    weights = [1.0 / (k + 1) ** s for k in range(n)]
    return lambda: rng.choices(range(n), weights)[0]


def shared_prefix_rag(rng: random.Random, requests: int) -> list[Request]:
    """The system prompt, 1-3 documents of a corpus of 300 (4-12 blocks each, drawn by
    Zipf popularity), then a question of 1-2 new blocks."""
    ids = _Ids()
    docs = [ids.take(rng.randint(4, 12)) for _ in range(300)]
    pick = _zipf(rng, len(docs))
    system = list(range(SYSTEM_BLOCKS))
    out = []
    for _ in range(requests):
        body = [b for _ in range(rng.randint(1, 3)) for b in docs[pick()]]
        out.append(system + body + ids.take(rng.randint(1, 2)))
    return out


def scan_heavy(rng: random.Random, requests: int) -> list[Request]:
    """Three requests in five use one of 40 prompt templates (the system prompt and 4-8
    blocks, drawn by Zipf popularity) and a new question block; the others are one-off
    documents of 16-64 blocks (a batch job's scan), never seen again."""
    ids = _Ids()
    system = list(range(SYSTEM_BLOCKS))
    templates = [system + ids.take(rng.randint(4, 8)) for _ in range(40)]
    pick = _zipf(rng, len(templates))
    out = []
    for _ in range(requests):
        if rng.random() < 0.6:
            out.append(templates[pick()] + ids.take(1))
        else:
            out.append(ids.take(rng.randint(16, 64)))
    return out


TRACES: dict[str, Callable[[random.Random, int], list[Request]]] = {
    "chat": multi_turn_chat, "rag": shared_prefix_rag, "scan": scan_heavy}


def chain_keys(request: Request) -> list[bytes]:
    """The request's block keys: each the hash of its parent's key and its own content."""
    keys, parent = [], b""
    for block in request:
        parent = hashlib.blake2b(parent + block.to_bytes(8, "little"), digest_size=16).digest()
        keys.append(parent)
    return keys


def ceiling_hit_ratio(trace: list[list[bytes]]) -> float:
    """Hits of a store that never evicts: the leading blocks each request shares with
    one seen before, over all blocks."""
    seen: set[bytes] = set()
    hits = total = 0
    for keys in trace:
        n = next((i for i, k in enumerate(keys) if k not in seen), len(keys))
        hits += n
        total += len(keys)
        seen.update(keys)
    return hits / total


def replay(trace: list[list[bytes]], policy: str, capacity_blocks: int, block_bytes: int) -> dict:
    """Replay ``trace`` against a store of one host tier holding ``capacity_blocks``
    blocks of ``block_bytes``, evicting by ``policy``; hits, misses and what it took."""
    from kvmesh.kv_store.integrity import checksum
    from kvmesh.kv_store.tiered_store import TieredStore
    from kvmesh.kv_store.tiers import HostTier

    page = max(MIN_SLOT, 1 << (16 * block_bytes - 1).bit_length())  # 16 slots a page
    slot = max(MIN_SLOT, 1 << (block_bytes - 1).bit_length())
    capacity = -(-capacity_blocks * slot // page) * page
    payload = bytes(block_bytes)
    check = checksum(payload)
    store = TieredStore([HostTier(capacity, page_bytes=page)], policy)
    hits = total = rejected = 0
    start = time.perf_counter()
    try:
        for keys in trace:
            held = store.lookup([[k] for k in keys])
            found = store.get_many(keys[:held]) if held else {}
            n = next((i for i, k in enumerate(keys[:held]) if k not in found), held)
            for i in range(n, len(keys)):
                rejected += not store.put(keys[i], payload, check, parent=keys[i - 1] if i else None)
            hits += n
            total += len(keys)
        stats = store.stats()
    finally:
        store.close()
    return {"hit_ratio": hits / total, "bytes_recomputed": (total - hits) * block_bytes,
            "evictions": stats.evictions, "rejected_puts": rejected,
            "capacity_blocks": capacity // slot, "replay_seconds": round(time.perf_counter() - start, 3)}


def run(requests: int, shares: Sequence[float], policies: Sequence[str], traces: Sequence[str],
        seed: int, block_bytes: int) -> dict:
    """The whole report (see the module's docstring)."""
    from kvmesh.kv_store.settings import StoreSettings

    report: dict = {"bench": "eviction", "seed": seed, "requests_per_trace": requests,
                    "block_bytes": block_bytes, "machine": f"{platform.machine()} {platform.processor()}".strip(),
                    "default_policy": StoreSettings.model_fields["policy"].default,
                    "traces": {}, "results": [], "winners": {}}
    for name in traces:
        trace = [chain_keys(r) for r in TRACES[name](random.Random(seed), requests)]
        distinct = len({k for keys in trace for k in keys})
        ceiling = ceiling_hit_ratio(trace)
        report["traces"][name] = {"blocks": sum(map(len, trace)), "distinct_blocks": distinct,
                                  "ceiling_hit_ratio": round(ceiling, 4)}
        rows = []
        for share in shares:
            capacity = max(16, round(share * distinct))
            lru = None
            for policy in sorted(policies, key=lambda p: p != "lru"):  # LRU first: the others' reference
                r = replay(trace, policy, capacity, block_bytes)
                lru = lru or r
                rows.append({"trace": name, "policy": policy, "capacity_share": share, **r,
                             "hit_ratio": round(r["hit_ratio"], 4),
                             "of_ceiling": round(r["hit_ratio"] / ceiling, 4) if ceiling else None,
                             "recomputed_vs_lru": round(r["bytes_recomputed"] / lru["bytes_recomputed"], 4)
                             if lru["bytes_recomputed"] else None})
        report["results"] += rows
        mean = {p: statistics.fmean(r["hit_ratio"] for r in rows if r["policy"] == p) for p in policies}
        report["winners"][name] = {"policy": max(mean, key=mean.get),
                                   "mean_hit_ratio": {p: round(v, 4) for p, v in mean.items()}}
    return report


def plot(report: dict, path: str) -> None:
    """Hit ratio against capacity, one panel per trace, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(report["traces"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [r for r in report["results"] if r["trace"] == name]
        for policy in dict.fromkeys(r["policy"] for r in rows):
            mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["capacity_blocks"])
            ax.plot([r["capacity_blocks"] for r in mine], [r["hit_ratio"] for r in mine], marker="o", label=policy)
        ax.axhline(report["traces"][name]["ceiling_hit_ratio"], color="grey", ls="--", lw=1, label="no eviction")
        ax.set_xscale("log")
        ticks = sorted({r["capacity_blocks"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{name} (winner: {report['winners'][name]['policy']})")
        ax.set_xlabel("capacity (blocks)")
        ax.set_ylabel("hit ratio")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object (else a table)")
    p.add_argument("--requests", type=int, default=3000, help="requests per trace")
    p.add_argument("--capacities", default="0.02,0.05,0.1,0.2,0.4", help=(
        "host tier capacities, as shares of each trace's distinct blocks, comma-separated"))
    p.add_argument("--policies", default=",".join(POLICIES), help="policies, comma-separated")
    p.add_argument("--traces", default=",".join(TRACES), help="traces, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated traces")
    p.add_argument("--block-bytes", type=int, default=16 << 10, help="bytes of one block")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw hit ratio against capacity here")


def main(args: argparse.Namespace) -> None:
    policies = [p for p in args.policies.split(",") if p]
    traces = [t for t in args.traces.split(",") if t]
    for name, known in (("policy", POLICIES), ("trace", TRACES)):
        unknown = [v for v in (policies if name == "policy" else traces) if v not in known]
        if unknown:
            sys.exit(f"unknown {name} {', '.join(unknown)}; choose from {', '.join(known)}")
    shares = [float(s) for s in args.capacities.split(",") if s]
    if not shares or any(not 0 < s <= 1 for s in shares) or args.requests < 1:
        sys.exit("--capacities must be shares in (0, 1] and --requests at least 1")
    report = run(args.requests, shares, policies, traces, args.seed, args.block_bytes)
    if args.plot:
        plot(report, args.plot)
        report["plot"] = args.plot
    if args.json:
        print(json.dumps(report))
        return
    for r in report["results"]:
        print(f"{r['trace']:5} {r['policy']:7} {r['capacity_blocks']:6} blocks  hit {r['hit_ratio']:.3f}"
              f"  ({r['of_ceiling']:.2f} of ceiling)  recomputed {r['bytes_recomputed'] / 2**20:8.1f} MiB"
              f"  (x{r['recomputed_vs_lru']} of LRU)")
    for name, w in report["winners"].items():
        print(f"{name}: {w['policy']} wins (mean hit ratio {w['mean_hit_ratio']})")
