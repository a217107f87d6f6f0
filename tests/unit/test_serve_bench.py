"""The parts of ``kvmesh bench serve``: workloads, engine flags, reading a recorded
stream, the timing correction and the output check."""

from __future__ import annotations

import pytest

from kvmesh.bench import serve_systems, serve_workloads
from kvmesh.bench.serve_client import Record, Run, read_stream, token_chunk_times
from kvmesh.bench.serve_report import build_report, compare_outputs



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


def test_kvmesh_workers_get_the_engine_flags():
    assert serve_systems.kvmesh_engine_options(["--block-size", "64", "--max-model-len=2048"]) == \
        {"block_size": 64, "worker_args": ("--max-model-len", "2048")}
    assert serve_systems.kvmesh_engine_options([]) == {"block_size": 32, "worker_args": ()}
    assert serve_systems.kvmesh_engine_options(["--num-gpu-blocks-override", "64", "--enforce-eager"]) == \
        {"block_size": 32, "worker_args": ("--num-gpu-blocks-override", "64", "--enforce-eager")}
    with pytest.raises(ValueError, match="--kv-transfer-config is not allowed"):  # kvmesh owns it
        serve_systems.kvmesh_engine_options(["--kv-transfer-config", "{}"])
    with pytest.raises(ValueError, match="--enable-prefix-caching is not allowed"):  # on prefill
        serve_systems.kvmesh_engine_options(["--enable-prefix-caching"])
    with pytest.raises(ValueError, match="unrecognized"):
        serve_systems.kvmesh_engine_options(["--no-such-flag", "1"])
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
