"""The bounds of a generation request, defined once for both sides of the worker API.

The router holds every client request to them (``router.core``), and a worker holds every
``Generate`` to them again (``worker_problems``): a worker's port is reachable by more
than the router, so it never trusts a request to have passed the router's checks.
"""

from __future__ import annotations

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_CACHE_SALT_CHARS = 256
MAX_SESSION_CHARS = 256            # a session's name, as a client gives it
MAX_SESSION_ID_CHARS = 64          # the id the router makes of it (kv_store.sessions: 32)
MAX_REQUEST_ID_CHARS = 128         # a client's; the router adds suffixes ("-prefill")
MAX_WORKER_REQUEST_ID_CHARS = 256
MAX_TEMPERATURE = 2.0
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def worker_problems(request, max_model_len: int, vocab_size: int) -> list[str]:
    """What is wrong with a worker ``GenerateRequest`` (``worker_pb2``) for an engine with
    context ``max_model_len`` and ``vocab_size`` tokens; empty when nothing is. The rules
    are the router's: a non-empty prompt of token ids in the vocabulary, ``max_tokens`` of
    at least 1 that fits the context beside the prompt, temperature within [0, 2], top_p
    within [0, 1] (0: unset, 1), top_k -1 or above (0 and -1: off), at most 16 stop
    strings of 1 to 256 characters, a cache salt of at most 256 characters, a session
    id of at most 64 and a request id of 1 to 256 characters (a client's 128 and the
    router's suffix)."""
    problems = []
    prompt = request.prompt_token_ids
    s = request.sampling
    if not prompt:
        problems.append("prompt_token_ids is empty")
    elif not (0 <= min(prompt) and max(prompt) < vocab_size):
        bad = next(t for t in prompt if not 0 <= t < vocab_size)
        problems.append(f"token id {bad} is outside the vocabulary of {vocab_size}")
    if s.max_tokens < 1:
        problems.append("max_tokens must be at least 1")
    elif len(prompt) + s.max_tokens > max_model_len:
        problems.append(f"prompt ({len(prompt)} tokens) plus max_tokens ({s.max_tokens}) "
                        f"exceeds the model's context of {max_model_len} tokens")
    if not 0.0 <= s.temperature <= MAX_TEMPERATURE:
        problems.append(f"temperature must be within [0, {MAX_TEMPERATURE:g}]")
    if not 0.0 <= s.top_p <= 1.0:
        problems.append("top_p must be within [0, 1]")
    if s.top_k < -1:
        problems.append("top_k must be -1 or 0 (off), or positive")
    if len(s.stop) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in s.stop):
        problems.append(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters")
    if any(not x for x in s.stop):
        problems.append("a stop string must not be empty")
    if len(request.cache_salt) > MAX_CACHE_SALT_CHARS:
        problems.append(f"cache_salt is longer than {MAX_CACHE_SALT_CHARS} characters")
    if len(request.session) > MAX_SESSION_ID_CHARS:
        problems.append(f"session is longer than {MAX_SESSION_ID_CHARS} characters")
    if not 1 <= len(request.request_id) <= MAX_WORKER_REQUEST_ID_CHARS:
        problems.append(f"request_id must have 1 to {MAX_WORKER_REQUEST_ID_CHARS} characters")
    return problems
