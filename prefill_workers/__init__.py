"""Prefill workers: a vLLM engine that computes prompts' KV and saves it to the store.

It also loads prefixes the store already holds, so a shared prefix is computed once.
"""

import asyncio

from engine_host.engine import EngineSettings
from engine_host.service import serve_worker

ROLE = "prefill"


def run(host: str, port: int, announcer=None, **settings) -> None:
    asyncio.run(serve_worker(EngineSettings(role=ROLE, **settings), host, port, announcer=announcer))
