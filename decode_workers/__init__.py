"""Decode workers: a vLLM engine that loads a prompt's KV from the store and generates.

Blocks the store cannot supply (missing, corrupt, late) are recomputed by the engine.
"""

from kvmesh.engine_host.service import run_worker

ROLE = "decode"


def run(settings, announcer=None) -> None:
    """Serve a worker of this role (``settings.role == ROLE``) until SIGINT/SIGTERM."""
    assert settings.role == ROLE, settings.role
    run_worker(settings, announcer=announcer)
