"""Tokenization and chat templating, off the event loop and bounded.

``Tokenizing`` holds the model's tokenizer. Its contract:

* ``encode`` and ``encode_chat`` never run the tokenizer or a chat template on the event
  loop that awaits them: the work runs on threads, and the tokenizer's own code runs
  there without Python's global interpreter lock (the Rust tokenizer's batch call), so
  a long prompt being tokenized leaves the loop free to serve everyone else.
* Heavy work — more than ``HEAVY_CHARS`` characters of text — runs on at most
  ``heavy_threads`` threads at once; at most ``max_waiting`` more heavy jobs wait for one,
  and beyond that a job is refused at once with ``Refused(429)``. Light work has
  ``LIGHT_THREADS`` threads of its own, so it never waits behind heavy work. Where the
  system allows it (Linux), heavy threads run at a lower CPU priority (``HEAVY_NICE``):
  on a machine whose cores they fill, the event loop's thread still gets one when it
  has work.
* A prompt longer than ``most`` tokens is counted, but its token ids are never built as
  a Python list (``Tokenized.ids`` is None): building millions of them would hold the
  interpreter lock, and with it the loop, for tens of milliseconds, for a prompt that
  will be refused anyway.
* Text that is no Unicode (a lone surrogate) is ``Refused(400)``; so is a conversation
  the chat template refuses.

A job whose caller is cancelled before it starts never runs; one that has started runs
to its end (a thread cannot be stopped) and still counts against the bound until then.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple, Sequence

HEAVY_CHARS = 32 * 1024  # about 30 ms of tokenizing on one core
LIGHT_THREADS = 4
HEAVY_NICE = 10  # added to a heavy thread's niceness: about a tenth of a contended core's time


class Refused(Exception):
    """Work refused: ``status`` 400 (input the tokenizer or template cannot take) or 429
    (too much heavy work already), with an HTTP error ``kind``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Tokenized(NamedTuple):
    """A prompt's token count, and its token ids when there are at most ``most`` of them."""

    count: int
    ids: list[int] | None


class Tokenizing:
    def __init__(self, tokenizer, heavy_threads: int, max_waiting: int):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        # The Rust tokenizer behind a fast Hugging Face tokenizer: its batch call gives
        # up the interpreter lock while it works. None for a tokenizer without one
        # (``tokenizer.encode`` then, which holds the lock: still off the loop).
        self._rust = getattr(tokenizer, "backend_tokenizer", None)
        if self._rust is not None:  # encode_batch_fast: the same ids, without character offsets
            self._encode_batch = getattr(self._rust, "encode_batch_fast", self._rust.encode_batch)
        self.heavy_threads, self.max_waiting = heavy_threads, max_waiting
        self._light = ThreadPoolExecutor(LIGHT_THREADS, thread_name_prefix="kvmesh-tokenize")
        self._heavy = ThreadPoolExecutor(heavy_threads, thread_name_prefix="kvmesh-tokenize-heavy",
                                         initializer=_lower_priority)
        self.heavy_jobs = 0  # heavy jobs running or waiting for a thread

    async def encode(self, text: str, most: int) -> Tokenized:
        """``text`` as the tokenizer encodes a prompt (special tokens added)."""
        return await self._run(len(text), lambda: self._encode(text, most, True))

    async def encode_chat(self, messages: Sequence[dict], most: int) -> Tokenized:
        """The conversation through the model's chat template (with the generation
        prompt), then tokenized as the template wrote it (no special tokens added)."""
        messages = list(messages)

        def job() -> Tokenized:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                          tokenize=False)
            except Exception as e:  # a template that refuses the conversation
                raise Refused(400, f"cannot apply the chat template: {e}") from None
            return self._encode(text, most, False)

        return await self._run(_chars(messages), job)

    def close(self) -> None:
        """Stop the threads once their jobs are done; jobs not started are dropped."""
        for pool in (self._light, self._heavy):
            pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, chars: int, job: Callable[[], Tokenized]) -> Tokenized:
        if chars <= HEAVY_CHARS:
            return await asyncio.wrap_future(self._light.submit(job))
        if self.heavy_jobs >= self.heavy_threads + self.max_waiting:
            raise Refused(429, f"server overloaded: {self.heavy_jobs} long prompts are being "
                                "tokenized or waiting to be; retry later", "overloaded_error")
        self.heavy_jobs += 1
        loop = asyncio.get_running_loop()
        future = self._heavy.submit(job)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._heavy_done))
        return await asyncio.wrap_future(future)

    def _heavy_done(self) -> None:
        self.heavy_jobs -= 1

    def _encode(self, text: str, most: int, special_tokens: bool) -> Tokenized:
        """On a worker thread: tokenize ``text``; the ids only when at most ``most``."""
        try:
            if self._rust is None:
                ids = self.tokenizer.encode(text, add_special_tokens=special_tokens)
                return Tokenized(len(ids), ids if len(ids) <= most else None)
            encoding = self._encode_batch([text], add_special_tokens=special_tokens)[0]
        except Exception:
            if _has_lone_surrogate(text):
                raise Refused(400, "the prompt has a lone surrogate: not Unicode text") from None
            raise
        count = len(encoding)
        return Tokenized(count, encoding.ids if count <= most else None)


def _lower_priority() -> None:
    """Make the calling thread nicer by ``HEAVY_NICE`` (Linux sets niceness per thread);
    nothing where that is not possible."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HEAVY_NICE)
    except (AttributeError, OSError):
        pass


def _chars(messages: Sequence[dict]) -> int:
    """About how many characters a conversation's template renders: its strings' length."""
    return sum(len(v) if isinstance(v, str) else len(str(v)) for m in messages for v in m.values())


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
