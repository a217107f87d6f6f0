"""What the client returns, and how requests and answers map to the protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kvmesh_proto import serving_pb2


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    prefix_tokens_from_store: int
    time_to_first_token_s: float
    route: str


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed answer; the last one has ``finish_reason`` and ``usage``."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    usage: Usage | None


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage


@dataclass(frozen=True)
class Model:
    id: str
    max_model_len: int


def build_request(prompt: str | Sequence[int], *, max_tokens: int = 16,
                  temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None, stop: Sequence[str] = (),
                  ignore_eos: bool = False, model: str = "", cache_salt: str = "",
                  request_id: str = "", session: str = "") -> serving_pb2.GenerateRequest:
    """The ``GenerateRequest`` of a call; a sampling field left None takes the server's
    default. ``max_tokens=0`` also means the server's default (16): the field is a plain
    proto3 ``uint32``, so 0 is never sent and the server cannot tell it from "not set"."""
    sampling = serving_pb2.Sampling(max_tokens=max_tokens, stop=list(stop), ignore_eos=ignore_eos)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                        ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    request = serving_pb2.GenerateRequest(model=model, sampling=sampling, cache_salt=cache_salt,
                                          request_id=request_id, session=session)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def to_chunk(msg: serving_pb2.GenerateResponse) -> Chunk:
    usage = None
    if msg.HasField("usage"):
        u = msg.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.prefix_tokens_from_store,
                      u.time_to_first_token_s, u.route)
    return Chunk(msg.request_id, msg.text, tuple(msg.token_ids), msg.finish_reason or None, usage)


def join(chunks: Sequence[Chunk]) -> Completion:
    if not chunks or chunks[-1].finish_reason is None:
        raise RuntimeError("the stream ended without a final response")
    last = chunks[-1]
    return Completion(last.request_id, "".join(c.text for c in chunks),
                      tuple(t for c in chunks for t in c.token_ids), last.finish_reason, last.usage)
