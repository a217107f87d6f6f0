"""Prefill workers: a vLLM engine that computes prompts' KV and saves it to the store.

It also loads prefixes the store already holds, so a shared prefix is computed once.
What makes it a KV producer is the connector's save side (``save_side``, ``step_saves``).
"""

from kvmesh.engine_host.service import run_worker

ROLE = "prefill"


def run(host: str, port: int, announcer=None, **settings) -> None:
    run_worker(ROLE, host, port, announcer=announcer, **settings)
