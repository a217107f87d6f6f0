"""The workloads of ``kvmesh bench serve``: what is sent, in what order, when.

A workload is a set of sessions that run concurrently. A session's steps run one after
the other: each is sent ``after_s`` seconds after the previous one's answer ended (a
user's think time), and not before its ``at_s`` (seconds from the workload's start). In a conversation (``Session.conversation``), each step's
prompt is the whole conversation so far (every earlier message and the answers the
system under test gave) plus the step's new message; otherwise every step is a prompt of
its own. The same workload object drives every system, so each gets the same messages at
the same offsets; only the answers (which become later prompts) are the system's own.

The text is seeded pseudo-text cut to a number of tokens of the model's tokenizer, so a
given seed and tokenizer always give the same workload. Each step has a ``kind`` (how
the report groups it: ``first_turn``/``follow_up``, ``cold``/``revisit``,
``long``/``short``) and a ``group`` (how the plot groups it: the turn, else the kind).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from kvmesh.cluster.models import synthetic_corpus

WORKLOADS = ("multi-turn", "cache-pressure", "interference")


@dataclass(frozen=True)
class Step:
    message: str          # the new user message
    output_tokens: int
    kind: str
    group: str
    at_s: float = 0.0     # not sent before this offset from the workload's start
    after_s: float = 0.0  # nor sooner than this after the session's previous answer ended


@dataclass(frozen=True)
class Session:
    name: str
    steps: tuple[Step, ...]
    conversation: bool    # True: a step's prompt is the conversation so far + its message


@dataclass(frozen=True)
class Workload:
    name: str
    sessions: tuple[Session, ...]
    focus: str            # the kind whose slowest requests the report breaks down
    config: dict          # the knobs that made it, for the report

    @property
    def requests(self) -> int:
        return sum(len(s.steps) for s in self.sessions)


class Text:
    """Seeded pseudo-text of a given length in tokens of ``tokenizer``."""

    def __init__(self, tokenizer, seed: int):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.lines = synthetic_corpus(seed, num_lines=2000)

    def make(self, tokens: int) -> str:
        """About ``tokens`` tokens of text (the cut may re-encode a token more or less)."""
        if tokens < 1:
            raise ValueError("a text needs at least one token")
        parts, have = [], 0
        while have < tokens:
            line = self.rng.choice(self.lines)
            parts.append(line)
            have += len(self.tokenizer.encode(line, add_special_tokens=False)) + 1
        ids = self.tokenizer.encode(" ".join(parts), add_special_tokens=False)[:tokens]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _positive(**values) -> None:
    bad = [f"{name} ({value})" for name, value in values.items() if not value > 0]
    if bad:
        raise ValueError(f"must be above 0: {', '.join(bad)}")


def _not_negative(**values) -> None:
    bad = [f"{name} ({value})" for name, value in values.items() if value < 0]
    if bad:
        raise ValueError(f"must not be negative: {', '.join(bad)}")


def multi_turn(tokenizer, *, users: int, turns: int, document_tokens: int, question_tokens: int,
               answer_tokens: int, shared_document: bool = False, user_interval_s: float = 1.0,
               think_time_s: float = 0.0, seed: int = 0) -> Workload:
    """Users who each read a long document (one for all with ``shared_document``, else one
    each) and ask ``turns`` questions about it, one conversation per user. User ``u``
    starts ``u * user_interval_s`` after the first; a follow-up is asked ``think_time_s``
    after the previous answer ended."""
    _positive(users=users, turns=turns, document_tokens=document_tokens,
              question_tokens=question_tokens, answer_tokens=answer_tokens)
    _not_negative(user_interval_s=user_interval_s, think_time_s=think_time_s)
    text = Text(tokenizer, seed)
    shared = text.make(document_tokens) if shared_document else None
    sessions = []
    for u in range(users):
        document = shared or text.make(document_tokens)
        steps = []
        for t in range(turns):
            question = f"Question {t + 1}: {text.make(question_tokens)}"
            message = f"Read this document.\n\n{document}\n\n{question}" if t == 0 else question
            steps.append(Step(message, answer_tokens, "first_turn" if t == 0 else "follow_up",
                              f"turn {t + 1}", at_s=u * user_interval_s,
                              after_s=think_time_s if t else 0.0))
        sessions.append(Session(f"user{u}", tuple(steps), conversation=True))
    return Workload("multi-turn", tuple(sessions), focus="follow_up", config=dict(
        users=users, turns=turns, document_tokens=document_tokens, question_tokens=question_tokens,
        answer_tokens=answer_tokens, shared_document=shared_document,
        user_interval_s=user_interval_s, think_time_s=think_time_s, seed=seed))


def cache_pressure(tokenizer, *, engine_kv_tokens: int, document_tokens: int, question_tokens: int,
                   answer_tokens: int, passes: int = 3, clients: int = 1, documents: int | None = None,
                   working_set_factor: float = 4.0, seed: int = 0) -> Workload:
    """Questions about many documents, in the same order pass after pass, so that the
    documents' KV (the working set) is at least ``working_set_factor`` times what the
    engine's KV cache holds (``engine_kv_tokens``): an engine alone must evict each
    document before it comes round again. ``documents`` None: just enough for that.
    ``clients`` sessions take the requests in turn (request ``i`` goes to client
    ``i % clients``). The first pass is ``cold``, the later ones ``revisit``."""
    _positive(engine_kv_tokens=engine_kv_tokens, document_tokens=document_tokens,
              question_tokens=question_tokens, answer_tokens=answer_tokens, passes=passes,
              clients=clients, working_set_factor=working_set_factor)
    needed = math.ceil(working_set_factor * engine_kv_tokens / document_tokens) + 1
    documents = needed if documents is None else documents
    if documents * document_tokens < working_set_factor * engine_kv_tokens:
        raise ValueError(f"{documents} documents of {document_tokens} tokens are less than "
                         f"{working_set_factor:g}x the engine's KV cache ({engine_kv_tokens} tokens); "
                         f"use at least {needed}")
    if passes < 2:
        raise ValueError("cache pressure needs at least 2 passes (the later ones revisit documents)")
    text = Text(tokenizer, seed)
    docs = [text.make(document_tokens) for _ in range(documents)]
    requests = []
    for p in range(passes):
        for d, document in enumerate(docs):
            question = f"Question about document {d + 1}: {text.make(question_tokens)}"
            requests.append(Step(f"Read this document.\n\n{document}\n\n{question}", answer_tokens,
                                 "cold" if p == 0 else "revisit", "cold" if p == 0 else "revisit"))
    sessions = tuple(Session(f"client{c}", tuple(requests[c::clients]), conversation=False)
                     for c in range(clients))
    return Workload("cache-pressure", sessions, focus="revisit", config=dict(
        engine_kv_tokens=engine_kv_tokens, documents=documents, document_tokens=document_tokens,
        working_set_tokens=documents * document_tokens, question_tokens=question_tokens,
        answer_tokens=answer_tokens, passes=passes, clients=clients, seed=seed))


def interference(tokenizer, *, long_prompts: int, long_tokens: int, long_interval_s: float,
                 short_requests: int, short_tokens: int, short_interval_s: float,
                 answer_tokens: int, seed: int = 0) -> Workload:
    """Long cold prompts (``long_prompts`` of ``long_tokens``, one every
    ``long_interval_s`` from the start) and short interactive requests (``short_requests``
    of ``short_tokens``, one every ``short_interval_s`` from half an interval in), each
    with ``answer_tokens`` to generate. Every request is a session of its own, sent at
    its time whatever the others are doing."""
    _positive(long_prompts=long_prompts, long_tokens=long_tokens, long_interval_s=long_interval_s,
              short_requests=short_requests, short_tokens=short_tokens,
              short_interval_s=short_interval_s, answer_tokens=answer_tokens)
    text = Text(tokenizer, seed)
    sessions = []
    for i in range(long_prompts):
        step = Step(f"Summarize this document.\n\n{text.make(long_tokens)}", answer_tokens, "long",
                    "long", at_s=i * long_interval_s)
        sessions.append(Session(f"long{i}", (step,), conversation=False))
    for i in range(short_requests):
        step = Step(text.make(short_tokens), answer_tokens, "short", "short",
                    at_s=(i + 0.5) * short_interval_s)
        sessions.append(Session(f"short{i}", (step,), conversation=False))
    return Workload("interference", tuple(sessions), focus="short", config=dict(
        long_prompts=long_prompts, long_tokens=long_tokens, long_interval_s=long_interval_s,
        short_requests=short_requests, short_tokens=short_tokens,
        short_interval_s=short_interval_s, answer_tokens=answer_tokens, seed=seed))


def warmup(tokenizer, block_size: int, seed: int = 10_000) -> Workload:
    """Untimed requests before a system's timed ones, on text no timed request shares: a
    prompt of a few blocks, the same prompt with more after it (a cached prefix: kvmesh's
    store load path), and a short prompt (under one block: kvmesh's decode-only path)."""
    text = Text(tokenizer, seed)
    head = text.make(4 * block_size)
    steps = (Step(head, 4, "warmup", "warmup"),
             Step(f"{head}\n\n{text.make(2 * block_size)}", 4, "warmup", "warmup"),
             Step(text.make(max(1, block_size // 2)), 4, "warmup", "warmup"))
    return Workload("warmup", (Session("warmup", steps, conversation=False),), focus="warmup",
                    config={})
