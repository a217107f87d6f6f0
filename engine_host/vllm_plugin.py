"""kvmesh's vLLM general plugin: vLLM runs ``register`` in every process it starts (the
entry point ``vllm.general_plugins`` in ``pyproject.toml``), engine core and workers alike.

On x86 CPUs with AMX, Linux gives a process the AMX tile registers only once it asks for
them (``arch_prctl(ARCH_REQ_XCOMP_PERM)``); an AMX instruction before that is an illegal
instruction. torch asks when its own kernels first pick AMX, but vLLM's CPU kernels can
get there first: a fresh engine whose first prompt had 4 tokens died with SIGILL (a 5-token
one took a torch path that asked, and everything after it worked). ``register`` asks up
front, through torch's own helper. Elsewhere (no AMX, not x86, no torch) it does nothing.
Safe to run more than once.
"""

from __future__ import annotations


def register() -> None:
    try:
        import torch

        init_amx = getattr(torch.cpu, "_init_amx", None)
        if init_amx is not None:
            init_amx()
    except Exception:  # best effort: without it, only AMX machines are at risk
        pass
