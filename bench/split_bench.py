"""``kvmesh bench splits``: a decode rank's KV load when the prefill's tensor-parallel
split differs from its own, against the same split.

(Also ``python -m kvmesh.bench.split_bench [--json]``.)

A store server in this process (a shared-memory host tier, offered as ``shm``; or no
transfer backend, ``get``) holds one prompt's blocks as writers of each split stored them
(each writing rank its shard of KV heads, ``engine_host.head_split``), in the geometry of
the generated ``bench`` model (8 layers, 4 KV heads of 64, blocks of 32 tokens,
bfloat16). Rank 0 of a reader of each split loads them into a paged cache of vLLM's CPU
layout through the decode path itself (``decode_workers.layer_loader.LayerLoad``: lease,
read, verify, gather or slice, copy), layer by layer, all layers before the timing ends.

Each case is a (writer split, reader split) pair; its baseline is the same reader loading
what a writer of its own split stored, timed in the same rounds (cases alternate, so a
busy machine loads them alike). Per case: the median load time, the rank's cache bytes
filled per second (``GBps``), the bytes read from the store per cache byte
(``read_per_placed``: a reader with fewer heads than the writer reads whole shards, since
checksums cover whole stored blocks) and ``ratio_to_same_split`` (its GB/s over the
baseline's). After the timing each case's cache is checked against the written KV.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import statistics
import sys
import time
import uuid
from typing import NamedTuple

HEADS, LAYERS, TOKENS, HEAD_DIM = 4, 8, 32, 64
CASES = [(1, 1), (2, 2), (4, 4), (2, 1), (4, 1), (1, 2), (4, 2), (1, 4)]  # (writer tp, reader tp)


class _Load(NamedTuple):
    req_id: str
    block_ids: list
    hashes: list
    parent: bytes | None = None
    shard_heads: int = 0


def _store(backend: str, nbytes: int):
    from kvmesh.kv_store.server import start_store_server
    from kvmesh.kv_store.tiered_store import TieredStore
    from kvmesh.kv_store.tiers import HostTier
    from kvmesh.kv_store.transfer import open_source

    shm = {"shm_name": "kvmesh-bench-" + uuid.uuid4().hex[:8]} if backend == "shm" else {}
    tiered = TieredStore([HostTier(nbytes, page_bytes=1 << 20, **shm)])
    source = open_source("shm", tiered.tiers[0]) if backend == "shm" else None
    server, port = start_store_server("127.0.0.1", 0, tiered,
                                      offers={"shm": source.descriptor()} if source else {})
    return f"127.0.0.1:{port}", (server, source, tiered)


def run(blocks: int = 64, rounds: int = 7, backends=("shm", "get")) -> dict:
    import torch

    from kvmesh.decode_workers.layer_loader import LayerLoad, ReaderCache
    from kvmesh.engine_host import head_split
    from kvmesh.engine_host.paged_layout import read_blocks
    from kvmesh.kv_store.client import StoreClient
    from kvmesh.kv_store.keys import KeySpace, chain_hashes, namespace

    names = {f"model.layers.{i}.self_attn.attn": i for i in range(LAYERS)}
    gen = torch.Generator().manual_seed(0)
    full = {n: torch.randn(blocks, HEADS, TOKENS, 2 * HEAD_DIM, generator=gen).to(torch.bfloat16) for n in names}
    ids = list(range(blocks))
    writers = sorted({w for w, _ in CASES})
    results = []
    for backend in backends:
        stored = sum(t.numel() * t.element_size() for t in full.values()) * (len(writers) + 1)
        address, (server, source, tiered) = _store(backend, stored)
        client = StoreClient(address, timeout_s=30)
        executor, readers = cf.ThreadPoolExecutor(1), ReaderCache(["shm"])
        try:
            hashes = {}
            for w in writers:  # each split's writers store the same prompt under its own namespace
                hashes[w] = chain_hashes([w] * (blocks * TOKENS), TOKENS)
                for rank in range(w):
                    start, end = head_split.rank_heads(rank, w, HEADS)
                    space = KeySpace(namespace("bench", "split"), (start, end))
                    for name, layer in names.items():
                        data = read_blocks(full[name][:, start:end].contiguous(), 0, ids)
                        client.put([(space.key(h, layer), d) for h, d in zip(hashes[w], data)])
            caches = {r: {n: torch.zeros(blocks, head_split.shard_size(HEADS, r), TOKENS, 2 * HEAD_DIM,
                                         dtype=torch.bfloat16) for n in names} for r in {r for _, r in CASES}}

            def load(writer: int, reader: int) -> tuple[float, int]:
                heads = head_split.rank_heads(0, reader, HEADS)
                loader = LayerLoad(client, readers, KeySpace(namespace("bench", "split"), heads), names,
                                   caches[reader], {n: 0 for n in names}, executor, 30.0)
                began = time.perf_counter()
                loader.start([_Load("r", ids, hashes[writer], shard_heads=head_split.shard_size(HEADS, writer))])
                failed = []
                stats = loader.finish(lambda req_id, b: failed.append(b))
                took = time.perf_counter() - began
                if failed:
                    raise RuntimeError(f"{writer}->{reader} failed to load {len(failed[0])} blocks")
                return took, stats["r"].nbytes

            times = {case: [] for case in CASES}
            read = {}
            for case in CASES:  # untimed: first-use costs (reader attach, buffer growth)
                load(*case)
            for _ in range(rounds):
                for case in CASES:
                    took, read[case] = load(*case)
                    times[case].append(took)
            verified = {}
            for writer, reader in CASES:
                load(writer, reader)
                start, end = head_split.rank_heads(0, reader, HEADS)
                verified[(writer, reader)] = all(torch.equal(caches[reader][n], full[n][:, start:end]) for n in names)
            for writer, reader in CASES:
                placed = sum(t.numel() * t.element_size() for t in caches[reader].values())
                median = statistics.median(times[(writer, reader)])
                base = statistics.median(times[(reader, reader)])
                results.append({
                    "backend": backend, "writer_tp": writer, "reader_tp": reader,
                    "same_split": writer == reader, "median_ms": round(median * 1e3, 3),
                    "GBps": round(placed / median / 1e9, 3),
                    "read_per_placed": round(read[(writer, reader)] / placed, 3),
                    "ratio_to_same_split": round(base / median, 3),
                    "verified": verified[(writer, reader)]})
        finally:
            client.close()
            executor.shutdown()
            readers.close()
            server.stop(0)
            if source:
                source.close()
            tiered.close()
    return {"results": results, "config": {"kv_heads": HEADS, "layers": LAYERS, "block_tokens": TOKENS,
                                           "head_dim": HEAD_DIM, "dtype": "bfloat16", "blocks": blocks,
                                           "rounds": rounds, "reader_rank": 0}}


def main(as_json: bool = False, blocks: int = 64, rounds: int = 7, backends=("shm", "get")) -> None:
    report = run(blocks, rounds, tuple(backends))
    if as_json:
        print(json.dumps(report))
        return
    for r in report["results"]:
        print(f"{r['backend']:4} tp{r['writer_tp']} -> tp{r['reader_tp']}: {r['median_ms']:8.2f} ms "
              f"{r['GBps']:6.2f} GB/s  read/placed {r['read_per_placed']:.2f}  "
              f"vs same split {r['ratio_to_same_split']:.2f}  verified {r['verified']}")


if __name__ == "__main__":
    main("--json" in sys.argv)
