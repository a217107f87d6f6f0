"""``kvmesh bench serve`` end to end on the tiny model: its report's shape, its output
check (with a negative control on the run's own records), and that it leaves nothing
running, after an interrupt too. No timing is asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvmesh.bench import serve_bench
from kvmesh.bench.serve_report import build_report
from tests.waiting import wait_until

CLI = [sys.executable, "-m", "kvmesh.cluster.cli", "bench", "serve"]
SMALL = ["--users", "2", "--turns", "2", "--document-tokens", "96", "--question-tokens", "8",
         "--answer-tokens", "6", "--user-interval", "0.2", "--no-multiprocessing"]


def _processes_naming(text: str) -> list[str]:
    """Command lines of the processes whose command line contains ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line and str(os.getpid()) != cmdline.parent.name:
            found.append(line)
    return found



@pytest.fixture(scope="module")
def small_run(tiny_model, tmp_path_factory):
    """One benchmark run on the tiny model: its report, records file and plot."""
    out = tmp_path_factory.mktemp("serve-bench")
    records, png = out / "records.json", out / "report.png"
    proc = subprocess.run([*CLI, "--model", tiny_model, *SMALL, "--records", str(records),
                           "--plot", str(png)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout[-3000:]  # one JSON line; progress went to stderr
    return json.loads(lines[0]), records, png, proc.stderr


def test_report_has_both_systems_figures_ratios_and_breakdown(small_run, tiny_model):
    report, _, png, stderr = small_run
    assert report["workload"] == "multi-turn" and report["benchmark"] == "serve"
    assert report["engine_args"] == ["--dtype", "float32", "--block-size", "32", "--max-model-len", "4096"]
    assert report["env"] == {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    for name in ("kvmesh", "vllm"):
        s = report["systems"][name]
        assert s["requests"] == {"sent": 4, "ok": 4, "failed": 0, "first_turn": 2, "follow_up": 2}
        for kind in ("first_turn", "follow_up"):
            ttft = s["ttft_ms"][kind]
            assert ttft["n"] == 2 and 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"] <= ttft["max"]
        assert 0 < s["itl_ms"]["n"] <= 4 * 5  # 6 tokens: at most 5 gaps per request (chunks may carry more)
        assert s["output_tokens"] == 4 * 6 and s["output_tokens_per_s"] > 0
    assert report["outputs_identical"] is True and report["mismatches"]["count"] == 0
    ratios = report["ratios_kvmesh_to_vllm"]
    for key in ("ttft_first_turn_p50", "ttft_follow_up_p50", "ttft_follow_up_p99", "ttft_follow_up_max",
                "itl_p50", "itl_p99", "output_tokens_per_s"):
        assert ratios[key] > 0, key
    breakdown = report["kvmesh_breakdown"]
    assert breakdown["kind"] == "follow_up" and breakdown["requests"] == 2
    row = breakdown["slowest"][0]
    assert {"route", "queue_ms", "prefill_ms", "decode_to_first_token_ms", "prefix_tokens_from_store",
            "prefix_tokens_local", "kv_transfer", "waiting_for_first_token_at_send"} <= set(row)
    # the document came from the store or stayed in the decode worker's own prefix cache
    assert row["prefix_tokens_from_store"]["decode"] + row["prefix_tokens_local"] > 0
    assert report["store"]["tiers"]["host"]["hits"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["plot"] == str(png)
    assert "kvmesh: warm-up" in stderr and "vllm: warm-up" in stderr
    assert not _processes_naming(tiny_model), "the benchmark left processes running"


def test_output_check_catches_outputs_made_different(small_run):
    """Negative control: the same run's records, with one answer of plain vLLM changed,
    must be reported as a mismatch and get no ratios."""
    _, records, _, _ = small_run
    assert serve_bench.report_from_records(str(records))["outputs_identical"] is True
    header, focus, runs, store = serve_bench.read_records(str(records))
    victim = next(r for r in runs["vllm"].records if r.kind == "follow_up")
    victim.token_ids = victim.token_ids[:-1] + [victim.token_ids[-1] + 1]
    report = build_report(header, focus, runs, store)
    assert report["outputs_identical"] is False and report["ratios_kvmesh_to_vllm"] is None
    assert "ratios_withheld" in report and not serve_bench.succeeded(report)
    (found,) = report["mismatches"]["shown"]
    assert (found["session"], found["step"], found["what"]) == (victim.session, victim.index, "token_ids")
    assert found["detail"]["first_difference_at"] == len(victim.token_ids) - 1

    victim.token_ids = None  # where token ids are missing, the text is compared
    victim.text += "!"
    (found,) = build_report(header, focus, runs, store)["mismatches"]["shown"]
    assert found["what"] == "text"


def test_interrupt_stops_everything(tiny_model, tmp_path):
    """Ctrl-C once kvmesh serves: exit status 130 and no process of the run left."""
    proc = subprocess.Popen([*CLI, "--model", tiny_model, *SMALL, "--systems", "kvmesh,vllm"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []

        def kvmesh_serving() -> bool:
            line = proc.stderr.readline()
            seen.append(line)
            return "kvmesh: warm-up" in line or proc.poll() is not None

        assert wait_until(kvmesh_serving, timeout_s=600, every_s=0), "".join(seen)[-3000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert wait_until(lambda: not _processes_naming(tiny_model), timeout_s=30), \
        _processes_naming(tiny_model)
