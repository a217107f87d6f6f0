"""Decode workers: a vLLM engine that loads a prompt's KV from the store and generates.

Blocks the store cannot supply (missing, corrupt, late) are recomputed by the engine.
"""

import asyncio

from engine_host.engine import EngineSettings
from engine_host.service import serve_worker

ROLE = "decode"


def run(host: str, port: int, announcer=None, **settings) -> None:
    asyncio.run(serve_worker(EngineSettings(role=ROLE, **settings), host, port, announcer=announcer))
