"""The default model, SmolLM2-135M-Instruct, served through a kvmesh cluster: a right
answer to a real question through the OpenAI chat API, and, with a prompt long enough
for its KV to go through the store, the same greedy tokens as a plain colocated vLLM run."""

from __future__ import annotations

import httpx
import openai
import pytest

from kvmesh.cluster.demo import SYSTEM_PROMPT
from kvmesh.cluster.local import LocalCluster
from tests.colocated import reference_table

BLOCK = 32
MAX_TOKENS = 32
QUESTION = "What is the capital of France? Answer in one sentence."
LONG = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def cluster(smollm2_model, tmp_path_factory):
    with LocalCluster(model=smollm2_model, served_model_name="smollm2", block_size=BLOCK,
                      decode_local_cache=False,  # every cached prefix comes through the store
                      run_dir=tmp_path_factory.mktemp("run")) as c:
        yield c


@pytest.fixture(scope="module")
def long_prompt(smollm2_model) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2_model).apply_chat_template(
        LONG, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def reference(smollm2_model, long_prompt, tmp_path_factory):
    return reference_table(smollm2_model, [long_prompt], MAX_TOKENS, BLOCK, tmp_path_factory.mktemp("ref"))


def test_the_default_model_knows_the_capital_of_france(cluster):
    client = openai.OpenAI(base_url=cluster.router_url + "/v1", api_key="unused")
    r = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=MAX_TOKENS,
                                       messages=[{"role": "user", "content": QUESTION}])
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    assert r.choices[0].finish_reason == "stop", answer  # a whole sentence, ended by the model


def test_a_prompt_from_the_store_gives_the_colocated_answer(cluster, long_prompt, reference):
    """Asked twice: the first answer's prompt is prefilled and saved, the second skips
    prefill and loads it from the store; both decode the colocated run's tokens."""
    assert len(long_prompt) > 64 + BLOCK  # too long to skip prefill the first time
    expected = reference[tuple(long_prompt)]
    for attempt in (1, 2):
        r = httpx.post(cluster.router_url + "/v1/chat/completions", timeout=120, json={
            "model": "smollm2", "messages": LONG, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True}).json()
        choice, info = r["choices"][0], r["kvmesh"]
        assert choice["prompt_token_ids"] == long_prompt
        assert expected == choice["token_ids"], (attempt, choice["message"]["content"])
        assert "Paris" in choice["message"]["content"]
        from_store = info["prefix_tokens_from_store"]["decode"]
        assert from_store >= len(long_prompt) - BLOCK, (attempt, info)  # every full block but the last
        assert info["kv_load_failed_tokens"] == 0, (attempt, info)
        assert info["prefill_skipped"] == (attempt == 2), (attempt, info)
