"""``kvmesh bench serve``: its report's shape, its output check (with a negative control),
its parts (workloads, engine flags, stream reading), and that it leaves nothing running.
No timing is asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmesh.bench import serve_bench, serve_systems, serve_workloads
from kvmesh.bench.serve_client import Record, Run, read_stream, token_chunk_times
from kvmesh.bench.serve_report import build_report, compare_outputs
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


# ---------------------------------------------------------------- end to end


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
    assert report["engine_args"] == ["--block-size", "32", "--max-model-len", "4096"]
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
            "kv_transfer", "waiting_for_first_token_at_send"} <= set(row)
    assert row["prefix_tokens_from_store"]["decode"] > 0  # the document came from the store
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
    proc = subprocess.Popen([*CLI, "--model", tiny_model, *SMALL, "--systems", "vllm,kvmesh"],
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


# ---------------------------------------------------------------- the parts


def _record(session="u", index=0, kind="follow_up", **fields) -> Record:
    base = dict(ok=True, ttft_s=0.1, itl_s=[0.01], prompt_tokens=10, output_tokens=2, text="ab",
                token_ids=[1, 2])
    return Record(session, index, kind, kind, **{**base, **fields})


def test_compare_outputs_names_each_kind_of_difference():
    same = [_record(index=i) for i in range(5)]
    other = [_record(index=0), _record(index=1, ok=False, error="boom"),
             _record(index=2, prompt_tokens=11), _record(index=3, token_ids=[1, 3]),
             _record(index=4, text="ax", token_ids=None)]
    found = compare_outputs({"kvmesh": same + [_record(index=5)], "vllm": other})
    assert [(f["step"], f["what"]) for f in found] == [
        (1, "failed"), (2, "prompt_tokens"), (3, "token_ids"), (4, "text"), (5, "sent")]
    assert found[0]["detail"] == {"vllm": "boom"}
    assert compare_outputs({"kvmesh": same, "vllm": list(same)}) == []


def test_one_system_gives_no_ratios_and_no_check():
    report = build_report({}, "follow_up", {"vllm": Run([_record()], 1.0)})
    assert report["outputs_identical"] is None and report["ratios_kvmesh_to_vllm"] is None
    assert "kvmesh_breakdown" not in report


def test_read_stream_takes_token_ids_usage_breakdown_and_errors():
    kvmesh = (b'data: {"choices": [{"delta": {"role": "assistant", "content": "a"}, "token_ids": [5]}]}\n\n'
              b'data: {"choices": [{"delta": {"content": "b"}, "token_ids": [6, 7]}], '
              b'"kvmesh": {"route": "least_loaded"}}\n\n'
              b'data: {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}}\n\n'
              b'data: [DONE]\n\n')
    found = read_stream(kvmesh)
    assert found["token_ids"] == [5, 6, 7] and found["prompt_tokens"] == 12
    assert found["kvmesh"] == {"route": "least_loaded"} and found["error"] == ""
    assert found["chunk_tokens"] == [1, 2]
    vllm_chat = (b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n'
                 b'data: {"choices": [{"delta": {"content": "a"}, "token_ids": [5]}]}\n\n')
    assert read_stream(vllm_chat)["chunk_tokens"] == [0, 1]
    assert read_stream(b'data: {"error": {"message": "no decode worker"}}\n\ndata: [DONE]\n\n')["error"] \
        == "no decode worker"
    assert read_stream(b'{"error": {"message": "bad field", "code": 400}}')["error"] == "bad field"


def test_chunks_without_tokens_are_left_out_of_the_timing():
    # vLLM's chat role chunk (no token) just before the first token's
    ttft, gaps = token_chunk_times(1.0, [0.001, 0.1, 0.1], [0, 1, 1, 1])
    assert ttft == pytest.approx(1.001) and gaps == pytest.approx([0.1, 0.1])
    assert token_chunk_times(1.0, [0.1], [1, 1]) == (1.0, [0.1])
    assert token_chunk_times(1.0, [0.1], [1, 1, 1]) == (1.0, [0.1])  # not lined up: unchanged


def test_kvmesh_gets_the_engine_flags_it_can_take_and_refuses_the_others():
    assert serve_systems.kvmesh_engine_options(["--block-size", "64", "--max-model-len=2048"]) == \
        {"block_size": 64, "worker_args": ("--max-model-len", "2048")}
    assert serve_systems.kvmesh_engine_options([]) == {"block_size": 32, "worker_args": ()}
    if not serve_systems.WORKERS_TAKE_VLLM_FLAGS:
        with pytest.raises(ValueError, match="--num-gpu-blocks-override"):
            serve_systems.kvmesh_engine_options(["--num-gpu-blocks-override", "64"])
    assert serve_systems.parse_flags(["--a", "1", "--b=2", "--c"]) == {"--a": "1", "--b": "2", "--c": None}
    with pytest.raises(ValueError, match="--flags"):
        serve_systems.parse_flags(["64"])


def test_the_plain_server_gets_the_same_engine_flags():
    command = serve_systems.plain_vllm_command("/m", "name", "127.0.0.1", 8000, ["--block-size", "32"])
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert command[-2:] == ["--block-size", "32"] and "--enforce-eager" in command


class _WordTokenizer:
    """Enough of a tokenizer for the workloads: one token per word."""

    def encode(self, text, add_special_tokens=False):
        return text.split()

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(ids)


def test_multi_turn_workload():
    w = serve_workloads.multi_turn(_WordTokenizer(), users=3, turns=2, document_tokens=50,
                                   question_tokens=5, answer_tokens=7, user_interval_s=2.0,
                                   think_time_s=0.5)
    assert w.requests == 6 and w.focus == "follow_up"
    first, second = w.sessions[1].steps
    assert (first.kind, first.group, first.at_s) == ("first_turn", "turn 1", 2.0)
    assert (second.kind, second.group, second.after_s) == ("follow_up", "turn 2", 0.5)
    assert all(s.conversation for s in w.sessions)
    documents = [s.steps[0].message.split("\n\n")[1] for s in w.sessions]
    assert len(set(documents)) == 3 and len(documents[0].split()) == 50
    shared = serve_workloads.multi_turn(_WordTokenizer(), users=3, turns=1, document_tokens=50,
                                        question_tokens=5, answer_tokens=7, shared_document=True)
    assert len({s.steps[0].message.split("\n\n")[1] for s in shared.sessions}) == 1


def test_cache_pressure_working_set_is_at_least_four_times_the_engine_cache():
    w = serve_workloads.cache_pressure(_WordTokenizer(), engine_kv_tokens=2048, document_tokens=1024,
                                       question_tokens=4, answer_tokens=4, passes=3, clients=2)
    assert w.config["working_set_tokens"] >= 4 * 2048 and w.config["documents"] == 9
    steps = [s for session in w.sessions for s in session.steps]
    assert len(steps) == 27 and sum(s.kind == "revisit" for s in steps) == 18
    with pytest.raises(ValueError, match="at least 9"):
        serve_workloads.cache_pressure(_WordTokenizer(), engine_kv_tokens=2048, document_tokens=1024,
                                       question_tokens=4, answer_tokens=4, documents=7)


def test_interference_workload_sends_short_requests_between_long_ones():
    w = serve_workloads.interference(_WordTokenizer(), long_prompts=2, long_tokens=100, long_interval_s=3,
                                     short_requests=4, short_tokens=10, short_interval_s=1,
                                     answer_tokens=4)
    at = {s.name: s.steps[0].at_s for s in w.sessions}
    assert at == {"long0": 0, "long1": 3, "short0": 0.5, "short1": 1.5, "short2": 2.5, "short3": 3.5}
    assert w.focus == "short"


@pytest.mark.parametrize("argv, message", [
    (["--engine-args=--model /x"], "--model is the benchmark's to set"),
    (["--engine-args=64"], "must be --flags"),
    (["--workload", "cache-pressure", "--engine-args=--block-size 32"], "--num-gpu-blocks-override"),
    (["--users", "0"], "must be at least 1"),
    (["--systems", "sglang"], "one or both of kvmesh,vllm"),
])
def test_bad_input_is_a_clear_error(argv, message):
    proc = subprocess.run([*CLI, "--size", "tiny", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
