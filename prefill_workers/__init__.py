"""Prefill workers: a vLLM engine that computes prompts' KV and saves it to the store.

It also loads prefixes the store already holds, so a shared prefix is computed once.
"""

from kvmesh.engine_host.service import run_worker

ROLE = "prefill"


def run(settings, announcer=None) -> None:
    """Serve a worker of this role (``settings.role == ROLE``) until SIGINT/SIGTERM."""
    assert settings.role == ROLE, settings.role
    run_worker(settings, announcer=announcer)
