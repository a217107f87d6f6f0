"""``kvmesh demo``: real questions through a running cluster's OpenAI chat API, with what
each answer cost.

Every question shares one system prompt. The first question's prefill computes it and
saves its blocks in the store; later questions (and both turns of the conversation) find
them there, skip prefill and load them into the decode worker. Each answer is printed
with its time to first token and the prompt tokens that came from the store.
"""

from __future__ import annotations

import json
import urllib.request

SYSTEM_PROMPT = (
    "You are the assistant of a public library's help line. Visitors ask short questions "
    "about the world: geography, nature, science, books and everyday facts. "
    "Answer every question in one short, correct sentence of plain English. "
    "Do not add greetings, lists, advice or offers of further help. "
    "Keep names, numbers and dates exact, and never invent facts that the question does not ask about. "
    "If a question follows an earlier one, read the conversation so far and answer the new question in its light. "
    "If you are not sure of an answer, say that you are not sure instead of guessing."
)

QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?",
]

# One conversation: the second question only makes sense after the first answer.
CONVERSATION = ["What is the capital of Italy?", "What language do people speak there?"]


def post(url: str, body: dict, timeout_s: float = 120.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def run_demo(cluster, max_tokens: int = 64) -> list[dict]:
    """Ask ``QUESTIONS`` one by one, then hold ``CONVERSATION`` (the follow-up sent with
    the first turn and its answer), all greedy, through ``cluster``'s
    ``/v1/chat/completions``; print each answer with its cost. Returns the responses in
    order. An HTTP error propagates (``urllib.error.HTTPError``)."""
    url = cluster.router_url + "/v1/chat/completions"
    system = {"role": "system", "content": SYSTEM_PROMPT}
    print(f"\nkvmesh demo: {len(QUESTIONS)} questions and a {len(CONVERSATION)}-turn conversation "
          f"for {cluster.served_model_name}, through {url}; every one starts with the same "
          "system prompt.\n", flush=True)

    def ask(label: str, messages: list[dict]) -> dict:
        r = post(url, {"model": cluster.served_model_name, "messages": messages,
                       "max_tokens": max_tokens, "temperature": 0})
        print(f"[{label}] {messages[-1]['content']}", flush=True)
        print(f"    {r['choices'][0]['message']['content'].strip()}", flush=True)
        print(f"    {cost(r)}\n", flush=True)
        return r

    results = [ask(f"question {i}", [system, {"role": "user", "content": q}])
               for i, q in enumerate(QUESTIONS, 1)]
    messages = [system]
    for turn, question in enumerate(CONVERSATION, 1):
        messages.append({"role": "user", "content": question})
        r = ask(f"conversation, turn {turn}", messages)
        messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
        results.append(r)
    return results


def cost(response: dict) -> str:
    """One line: prompt size, time to first token and where the prompt's KV came from."""
    info = response["kvmesh"]
    from_store = info["prefix_tokens_from_store"]
    prefill = "skipped" if info["prefill_skipped"] else f"{from_store['prefill']} tokens"
    return (f"prompt {response['usage']['prompt_tokens']} tokens, "
            f"time to first token {info['ttft_s'] * 1000:.0f} ms, "
            f"from store: prefill {prefill}, decode {from_store['decode']} tokens; "
            f"decode's own prefix cache {info['prefix_tokens_local']} tokens")
