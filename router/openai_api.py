"""Request and response shapes of the OpenAI-compatible HTTP API."""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from kvmesh.router.core import INT32_MAX, INT64_MAX, INT64_MIN, Sampling
from kvmesh_proto.limits import MAX_CACHE_SALT_CHARS, MAX_SESSION_CHARS


class KvmeshOptions(BaseModel):
    """``kvmesh``: kvmesh's own request options. ``session`` names the conversation the
    request belongs to (its KV is kept while it is idle, moving to slower tiers), within
    the request's ``cache_salt``."""

    model_config = ConfigDict(extra="ignore")

    session: str | None = Field(None, min_length=1, max_length=MAX_SESSION_CHARS)


class SessionRequest(BaseModel):
    """``POST /v1/sessions/release`` and ``/v1/sessions/lookup``: a session by its name,
    within a tenant's ``cache_salt`` (the one its requests carried)."""

    model_config = ConfigDict(extra="ignore")

    session: str = Field(..., min_length=1, max_length=MAX_SESSION_CHARS)
    cache_salt: str | None = Field(None, max_length=MAX_CACHE_SALT_CHARS)


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` sends the usage in a chunk of its own, with no
    choices, before ``[DONE]`` (as OpenAI does); vLLM's ``continuous_usage_stats`` is not
    supported."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None

    @field_validator("continuous_usage_stats")
    @classmethod
    def _not_continuous(cls, value):
        if value:
            raise PydanticCustomError("unsupported", "continuous_usage_stats is not supported; "
                                      "leave it out or send null or false")
        return value


class _Common(BaseModel):
    """Fields completions and chat share. Unknown fields are ignored: clients send extras.
    A field sent as null takes its default, as OpenAI allows for every optional field.
    Fields of OpenAI's or vLLM's API that kvmesh does not implement (``NEUTRAL``) are
    accepted only at a value that asks for nothing (their default, or null), else a 400
    naming the field: never silently ignored.
    Ranges are those of the worker protocol's fields (``top_k`` int32, ``seed`` int64, as
    vLLM takes them), so a value out of range is a 400, never a failure further on."""

    model_config = ConfigDict(extra="ignore")

    # Unimplemented field -> the values (besides null) that ask for nothing.
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        "logprobs": (), "presence_penalty": (0,), "frequency_penalty": (0,),
        "repetition_penalty": (1,), "length_penalty": (1,), "min_tokens": (0,), "min_p": (0,),
        "logit_bias": ({},), "best_of": (1,), "use_beam_search": (False,),
        "response_format": ({"type": "text"},), "stop_token_ids": ([],), "bad_words": ([],),
        "allowed_token_ids": (), "prompt_logprobs": (), "include_stop_str_in_output": (False,),
        "truncate_prompt_tokens": (), "structured_outputs": (), "guided_json": (),
        "guided_regex": (), "guided_choice": (), "guided_grammar": ()}

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("*")
    @classmethod
    def _unimplemented_only_neutral(cls, value, info):
        neutral = cls.NEUTRAL.get(info.field_name)
        if neutral is not None and value not in neutral:
            allowed = " or ".join(json.dumps(v) for v in (None, *neutral))
            raise PydanticCustomError("unsupported", f"{info.field_name} is not supported; leave "
                                      f"it out or send {allowed}")
        return value

    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, le=INT32_MAX, description="-1 or 0: off")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    return_token_ids: bool = False
    cache_salt: str | None = Field(None, max_length=256)
    user: str | None = None
    kvmesh: KvmeshOptions | None = None
    stream_options: StreamOptions | None = None
    # unimplemented (NEUTRAL)
    logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    length_penalty: Any = None
    min_tokens: Any = None
    min_p: Any = None
    logit_bias: Any = None
    best_of: Any = None
    use_beam_search: Any = None
    response_format: Any = None
    stop_token_ids: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    prompt_logprobs: Any = None
    include_stop_str_in_output: Any = None
    truncate_prompt_tokens: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None

    def session(self, from_user: bool) -> str | None:
        """The request's session name: ``kvmesh.session``, else (``from_user``) ``user``."""
        if self.kvmesh is not None and self.kvmesh.session:
            return self.kvmesh.session
        return (self.user or None) if from_user else None

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk of its own for the usage (``stream_options``)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> Sampling:
        stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return Sampling(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                        top_k=self.top_k, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos)


class CompletionRequest(_Common):
    """``POST /v1/completions``. One prompt per request: text or token ids, or a list
    holding exactly one of those (as OpenAI's batch form, with a batch of one).
    ``logprobs`` is refused even at 0 (that asks for the chosen tokens' logprobs)."""

    NEUTRAL: ClassVar[dict[str, tuple]] = {**_Common.NEUTRAL, "echo": (False,), "suffix": ("",)}

    prompt: str | list[int] = Field(..., description="text, or token ids")
    echo: Any = None
    suffix: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            if len(value) != 1:
                raise PydanticCustomError("one_prompt", "only one prompt per request ({count} given)",
                                          {"count": len(value)})
            return value[0]
        return value

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if len(value) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and any(t < 0 for t in value):
            raise ValueError("token ids must be non-negative")
        return value


class ChatMessage(BaseModel):
    """One message of a conversation, validated into what the chat template gets (its
    ``model_dump()``, fields left out or null omitted). ``content`` is text or a list of
    text parts (``{"type": "text", "text": ...}``, joined with newlines, as vLLM does);
    other parts (images, audio) are a 400. An assistant message may have null content
    (it becomes ""). A ``developer`` message goes to the template as ``system`` (the role
    OpenAI renamed it from, which templates know); a ``tool`` message goes as it is, with
    its ``tool_call_id``, and a template that cannot render it makes the request a 400."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value):
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise PydanticCustomError(
                    "text_parts_only", f"only text content parts are supported (type \"text\"), "
                    f"not {part.get('type')!r}")
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _template_form(self):
        if self.content is None:
            if self.role != "assistant":
                raise PydanticCustomError("content_missing", "a {role} message needs content",
                                          {"role": self.role})
            self.content = ""
        if self.role == "developer":
            self.role = "system"
        return self

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is accepted too (and wins
    over ``max_tokens``). With neither, the answer may take what the prompt leaves of the
    model's context, as in OpenAI's and vLLM's chat APIs (completions default to 16)."""

    NEUTRAL: ClassVar[dict[str, tuple]] = {
        **_Common.NEUTRAL, "logprobs": (False,), "top_logprobs": (0,), "tools": ([],),
        "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
        "modalities": (["text"],), "audio": (), "prediction": (), "web_search_options": (),
        "echo": (False,), "chat_template": (), "chat_template_kwargs": ({},),
        "add_generation_prompt": (True,), "continue_final_message": (False,), "documents": ([],)}

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # unimplemented (NEUTRAL)
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    echo: Any = None
    chat_template: Any = None
    chat_template_kwargs: Any = None
    add_generation_prompt: Any = None
    continue_final_message: Any = None
    documents: Any = None

    def sampling(self) -> Sampling:
        s = super().sampling()
        if self.max_completion_tokens is not None:
            s.max_tokens = self.max_completion_tokens
        return s


def error_body(message: str, status: int, kind: str = "invalid_request_error",
               param: str | None = None) -> dict:
    """OpenAI's error shape. Text that is not Unicode (a lone surrogate echoed from a
    request) is escaped, so the body always encodes as UTF-8 JSON."""
    def text(value: str | None) -> str | None:
        return None if value is None else value.encode("utf-8", "backslashreplace").decode("utf-8")

    return {"error": {"message": text(message), "type": kind, "param": text(param), "code": status}}


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None,
                     created: int | None = None) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }


def chat_completion(request_id: str, model: str, text: str, finish_reason: str | None) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
    }


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None,
               created: int) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
