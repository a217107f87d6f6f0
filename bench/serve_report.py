"""Figures, the output check and the kvmesh breakdown of ``kvmesh bench serve``.

All pure functions of the records (``serve_client.Record``), so a report can be rebuilt
from saved records. Latencies are in milliseconds, percentiles by nearest rank
(``bench.stats.percentile``). Ratios are kvmesh / plain vLLM: below 1 is kvmesh faster for
latencies, above 1 for throughput. They are given only when both systems produced the
same outputs for every request (``compare_outputs`` finds none differing): a speed-up
over different tokens means nothing.
"""

from __future__ import annotations

import statistics
from typing import Iterable

from kvmesh.bench.serve_client import Record, Run
from kvmesh.bench.stats import percentile

MISMATCHES_SHOWN = 20
SLOWEST_SHOWN = 5


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def distribution_ms(seconds: Iterable[float], quantiles=(0.5, 0.9, 0.99)) -> dict:
    """``{"n", "p50", "p90", "p99", "max"}`` in ms (None figures when there is no sample)."""
    ordered = sorted(seconds)
    out = {"n": len(ordered)}
    for q in quantiles:
        out[f"p{round(q * 100)}"] = _ms(percentile(ordered, q)) if ordered else None
    out["max"] = _ms(ordered[-1]) if ordered else None
    return out


def summarize(run: Run) -> dict:
    """One system's figures: requests, TTFT per kind, inter-token latency (one gap per
    streamed chunk after the first, as vLLM's benchmark counts it), output tokens/s over
    the workload's duration."""
    ok = [r for r in run.records if r.ok]
    kinds = sorted({r.kind for r in run.records})
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": {"sent": len(run.records), "ok": len(ok), "failed": len(run.records) - len(ok),
                     **{kind: sum(r.kind == kind for r in ok) for kind in kinds}},
        "ttft_ms": {kind: distribution_ms(r.ttft_s for r in ok if r.kind == kind) for kind in kinds},
        "itl_ms": distribution_ms((gap for r in ok for gap in r.itl_s), quantiles=(0.5, 0.99)),
        "output_tokens": output_tokens,
        "duration_s": round(run.duration_s, 2),
        "output_tokens_per_s": round(output_tokens / run.duration_s, 2) if run.duration_s > 0 else None,
        "errors": sorted({r.error for r in run.records if not r.ok})[:5],
    }


def ratios(kvmesh: dict, vllm: dict) -> dict:
    """kvmesh / vLLM for each figure both summaries have: ``ttft_<kind>_<stat>``,
    ``itl_p50``, ``itl_p99``, ``output_tokens_per_s``."""
    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    out = {}
    for kind in sorted(set(kvmesh["ttft_ms"]) & set(vllm["ttft_ms"])):
        for stat in ("p50", "p90", "p99", "max"):
            out[f"ttft_{kind}_{stat}"] = ratio(kvmesh["ttft_ms"][kind][stat], vllm["ttft_ms"][kind][stat])
    for stat in ("p50", "p99"):
        out[f"itl_{stat}"] = ratio(kvmesh["itl_ms"][stat], vllm["itl_ms"][stat])
    out["output_tokens_per_s"] = ratio(kvmesh["output_tokens_per_s"], vllm["output_tokens_per_s"])
    return out


def compare_outputs(runs: dict[str, list[Record]]) -> list[dict]:
    """Every request whose outcome differs between the two systems of ``runs`` (name ->
    records): sent by one only, failed on either, a different prompt length (so a
    different prompt), different text, or different token ids where both have them.
    Empty when the outputs are identical."""
    (a, ra), (b, rb) = runs.items()
    left, right = {r.key: r for r in ra}, {r.key: r for r in rb}
    found = []
    for key in sorted(set(left) | set(right)):
        x, y = left.get(key), right.get(key)
        where = {"session": key[0], "step": key[1], "kind": (x or y).kind}
        if x is None or y is None:
            found.append({**where, "what": "sent", "detail": f"sent only to {a if y is None else b}"})
        elif not (x.ok and y.ok):
            failed = {name: r.error for name, r in ((a, x), (b, y)) if not r.ok}
            found.append({**where, "what": "failed", "detail": failed})
        elif x.prompt_tokens is not None and y.prompt_tokens is not None \
                and x.prompt_tokens != y.prompt_tokens:
            found.append({**where, "what": "prompt_tokens", "detail": {a: x.prompt_tokens, b: y.prompt_tokens}})
        elif x.token_ids is not None and y.token_ids is not None and x.token_ids != y.token_ids:
            at = _first_difference(x.token_ids, y.token_ids)
            found.append({**where, "what": "token_ids", "detail": {
                "first_difference_at": at, a: x.token_ids[at:at + 8], b: y.token_ids[at:at + 8]}})
        elif x.text != y.text:
            at = _first_difference(x.text, y.text)
            found.append({**where, "what": "text", "detail": {
                "first_difference_at": at, a: x.text[at:at + 40], b: y.text[at:at + 40]}})
    return found


def _first_difference(x, y) -> int:
    for i, (p, q) in enumerate(zip(x, y)):
        if p != q:
            return i
    return min(len(x), len(y))


def _pending_at(records: list[Record], me: Record) -> dict[str, int]:
    """Requests (by kind) sent before ``me`` and still without their first token when it was sent."""
    out: dict[str, int] = {}
    for r in records:
        if r is not me and r.start_s <= me.start_s and (not r.ok or r.start_s + r.ttft_s > me.start_s):
            out[r.kind] = out.get(r.kind, 0) + 1
    return out


def breakdown_row(record: Record, records: list[Record]) -> dict:
    """Where one kvmesh request's time to first token went, from the router's ``kvmesh``
    object: the admission queue, the prefill call (with the prefix the prefill worker
    loaded from the store), then the decode side up to the first token (the KV load, the
    uncached tokens computed there, and any wait in the decode engine); ``front_ms`` is
    what the client saw beyond the router's own TTFT (HTTP, chat template, tokenizing);
    ``stages_ms`` the router's own finer breakdown (``breakdown`` in the object: engine
    queues, compute, store lookup, load, first decode step), where it gives one."""
    info = record.kvmesh or {}
    router_ttft = info.get("ttft_s") or 0.0
    queue, prefill = info.get("queue_s") or 0.0, info.get("prefill_s") or 0.0
    from_store = info.get("prefix_tokens_from_store") or {}
    transfer = info.get("kv_transfer") or {}
    prompt = record.prompt_tokens or 0
    local = info.get("prefix_tokens_local", 0)
    return {
        "session": record.session, "step": record.index, "kind": record.kind,
        "ttft_ms": _ms(record.ttft_s), "prompt_tokens": prompt, "route": info.get("route"),
        "prefill": "skipped" if info.get("prefill_skipped") else ("ok" if info.get("prefill_ok") else "failed"),
        "queue_ms": _ms(queue), "prefill_ms": _ms(prefill),
        "decode_to_first_token_ms": _ms(max(0.0, router_ttft - queue - prefill)),
        "front_ms": _ms(max(0.0, record.ttft_s - router_ttft)),
        "prefix_tokens_from_store": {"prefill": from_store.get("prefill", 0),
                                     "decode": from_store.get("decode", 0)},
        "prefix_tokens_local": local,
        "uncached_tokens_at_decode": max(0, prompt - from_store.get("decode", 0) - local),
        "tokens_saved": info.get("tokens_saved"),
        "stages_ms": {stage: _ms(seconds or 0.0) for stage, seconds in (info.get("breakdown") or {}).items()},
        "kv_transfer": {"backend": transfer.get("backend"), "bytes": transfer.get("bytes"),
                        "ms": _ms(transfer.get("seconds") or 0.0),
                        "waited_ms": _ms(transfer.get("waited_s") or 0.0)},
        "waiting_for_first_token_at_send": _pending_at(records, record),
    }


def kvmesh_breakdown(records: list[Record], focus: str, shown: int = SLOWEST_SHOWN) -> dict:
    """The ``focus`` kind's requests on kvmesh: the ``shown`` slowest (by TTFT) broken down
    (``breakdown_row``), and medians over all of them."""
    mine = [r for r in records if r.ok and r.kind == focus and r.kvmesh]
    rows = [breakdown_row(r, records) for r in mine]
    if not rows:
        return {"kind": focus, "requests": 0, "slowest": [], "medians": {}}

    def median(values):
        values = list(values)
        return round(statistics.median(values), 2) if values else None

    ran = [x for x in rows if x["prefill"] != "skipped"]
    return {
        "kind": focus, "requests": len(rows),
        "prefill_skipped": len(rows) - len(ran),
        "prefix_loaded_by_both": sum(1 for x in rows if x["prefix_tokens_from_store"]["prefill"] > 0
                                     and x["prefix_tokens_from_store"]["decode"] > 0),
        "medians": {
            "ttft_ms": median(x["ttft_ms"] for x in rows),
            "queue_ms": median(x["queue_ms"] for x in rows),
            "prefill_ms": median(x["prefill_ms"] for x in rows),
            "prefill_ms_when_run": median(x["prefill_ms"] for x in ran),
            "decode_to_first_token_ms": median(x["decode_to_first_token_ms"] for x in rows),
            "front_ms": median(x["front_ms"] for x in rows),
            "prompt_tokens": median(x["prompt_tokens"] for x in rows),
            "prefix_tokens_from_store_prefill": median(x["prefix_tokens_from_store"]["prefill"] for x in rows),
            "prefix_tokens_from_store_decode": median(x["prefix_tokens_from_store"]["decode"] for x in rows),
            "prefix_tokens_local": median(x["prefix_tokens_local"] for x in rows),
            "uncached_tokens_at_decode": median(x["uncached_tokens_at_decode"] for x in rows),
            "kv_transfer_ms": median(x["kv_transfer"]["ms"] for x in rows),
            "stages_ms": {stage: median(x["stages_ms"][stage] for x in rows if stage in x["stages_ms"])
                          for stage in dict.fromkeys(k for x in rows for k in x["stages_ms"])},
        },
        "slowest": sorted(rows, key=lambda x: -x["ttft_ms"])[:shown],
    }


def build_report(header: dict, focus: str, runs: dict[str, Run], store: dict | None = None) -> dict:
    """The benchmark's report: ``header`` (workload, settings, machine), each system's
    figures, the output check, and — only when the outputs are identical and both systems
    ran — the ratios kvmesh / vLLM; kvmesh's breakdown of its slowest ``focus`` requests
    and the store's tier figures (``store``)."""
    report = dict(header)
    report["systems"] = {name: summarize(run) for name, run in runs.items()}
    if "kvmesh" in runs:
        report["kvmesh_breakdown"] = kvmesh_breakdown(runs["kvmesh"].records, focus)
        report["store"] = store
    if set(runs) == {"kvmesh", "vllm"}:
        mismatches = compare_outputs({name: run.records for name, run in runs.items()})
        report["outputs_identical"] = not mismatches
        report["mismatches"] = {"count": len(mismatches), "shown": mismatches[:MISMATCHES_SHOWN]}
        if mismatches:
            report["ratios_kvmesh_to_vllm"] = None
            report["ratios_withheld"] = (f"{len(mismatches)} request(s) differ between the systems; "
                                         "no speed-up is reported over different outputs")
        else:
            report["ratios_kvmesh_to_vllm"] = ratios(report["systems"]["kvmesh"], report["systems"]["vllm"])
    else:
        report["outputs_identical"] = None  # one system: nothing to compare with
        report["ratios_kvmesh_to_vllm"] = None
    return report
