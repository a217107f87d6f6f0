"""The HTTP API's request models on their own (``router.openai_api``): what valid OpenAI
requests mean, and which ones are refused (a ``ValidationError``, answered as a 400)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvmesh.router.openai_api import ChatCompletionRequest, CompletionRequest

USER = {"role": "user", "content": "hi"}


def refused(model, body: dict) -> dict:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return e.value.errors()[0]


def test_null_means_the_default():
    nulls = dict.fromkeys(["max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop",
                           "stream", "ignore_eos", "return_token_ids", "cache_salt", "user",
                           "model", "echo"])
    completion = CompletionRequest.model_validate({"prompt": "hi", **nulls})
    assert completion.sampling() == CompletionRequest.model_validate({"prompt": "hi"}).sampling()
    assert completion.sampling().max_tokens == 16 and completion.stream is False
    chat = ChatCompletionRequest.model_validate({"messages": [USER], "max_completion_tokens": None,
                                                 **nulls})
    assert chat.sampling() == ChatCompletionRequest.model_validate({"messages": [USER]}).sampling()
    assert chat.sampling().max_tokens is None and chat.n == 1
    assert refused(CompletionRequest, {"prompt": None})["loc"] == ("prompt",)


def test_one_prompt_per_request_in_any_of_openais_forms():
    for prompt, meant in (("hi", "hi"), (["hi"], "hi"), ([5, 6], [5, 6]), ([[5, 6]], [5, 6])):
        assert CompletionRequest.model_validate({"prompt": prompt}).prompt == meant
    for prompt in (["a", "b"], [[5], [6]]):
        assert "only one prompt per request" in refused(CompletionRequest, {"prompt": prompt})["msg"]
    for prompt in ([], [""], [[]], ""):
        assert "must not be empty" in refused(CompletionRequest, {"prompt": prompt})["msg"]


def test_chat_messages_as_openai_sends_them():
    """Text parts are joined with newlines; ``developer`` is rendered as ``system``; an
    assistant message may have null content; ``tool`` messages keep their call id; what
    the template gets has no null fields."""
    chat = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "assistant", "content": None, "name": None}]})
    assert [m.model_dump() for m in chat.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one\ntwo"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "assistant", "content": ""}]


def test_chat_messages_kvmesh_cannot_serve_are_refused():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    error = refused(ChatCompletionRequest, {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this"}, image]}]})
    assert error["loc"] == ("messages", 0, "content") and "only text content parts" in error["msg"]
    for role in ("user", "system", "developer", "tool"):
        error = refused(ChatCompletionRequest, {"messages": [{"role": role, "content": None}]})
        assert error["msg"] == f"a {role} message needs content"
    assert refused(ChatCompletionRequest, {"messages": [{"role": "robot", "content": "x"}]})


NEUTRAL_CHAT = {"logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0.0,
                "repetition_penalty": 1.0, "min_tokens": 0, "min_p": 0, "logit_bias": {},
                "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
                "stop_token_ids": [], "stream_options": {"include_usage": False},
                "parallel_tool_calls": True, "not_a_field_anywhere": 1}


def test_unimplemented_fields_are_accepted_only_when_they_ask_for_nothing():
    """Neutral values (and null) are served as if left out, unknown fields are ignored;
    any other value of a field kvmesh knows but does not implement is refused, naming it."""
    plain = ChatCompletionRequest.model_validate({"messages": [USER]}).sampling()
    assert ChatCompletionRequest.model_validate({"messages": [USER], **NEUTRAL_CHAT}).sampling() == plain
    assert ChatCompletionRequest.model_validate(
        {"messages": [USER], **dict.fromkeys(ChatCompletionRequest.NEUTRAL)}).sampling() == plain
    CompletionRequest.model_validate({"prompt": "hi", "logprobs": None, "best_of": 1, "suffix": "",
                                      "echo": False, "presence_penalty": 0})
    for field, value in (("logprobs", True), ("top_logprobs", 2), ("presence_penalty", 0.5),
                         ("frequency_penalty", -1), ("repetition_penalty", 1.1), ("min_tokens", 3),
                         ("min_p", 0.1), ("logit_bias", {"5": 100}), ("tools", [{"type": "function"}]),
                         ("tool_choice", "required"), ("response_format", {"type": "json_object"}),
                         ("stop_token_ids", [2]), ("chat_template_kwargs", {"enable_thinking": False})):
        error = refused(ChatCompletionRequest, {"messages": [USER], field: value})
        assert error["loc"] == (field,) and error["msg"].startswith(f"{field} is not supported"), error
    # logprobs=0 asks for the chosen tokens' logprobs in OpenAI's (and vLLM's) completions
    for field, value in (("logprobs", 0), ("logprobs", 1), ("best_of", 2), ("suffix", "end"),
                         ("echo", True)):
        assert refused(CompletionRequest, {"prompt": "hi", field: value})["loc"] == (field,)
    error = refused(CompletionRequest, {"prompt": "hi", "stream_options": {"continuous_usage_stats": True}})
    assert error["loc"] == ("stream_options", "continuous_usage_stats")
    usage = {"prompt": "hi", "stream_options": {"include_usage": True}}
    assert CompletionRequest.model_validate(usage).include_usage
