"""kvmesh's vLLM general plugin: vLLM runs ``register`` in every process it starts (the
entry point ``vllm.general_plugins`` in ``pyproject.toml``), engine core and workers alike.

Two things, each best effort and safe to run more than once:

* **AMX.** On x86 CPUs with AMX, Linux gives a process the AMX tile registers only once it
  asks for them (``arch_prctl(ARCH_REQ_XCOMP_PERM)``); an AMX instruction before that is
  an illegal instruction. torch asks when its own kernels first pick AMX, but vLLM's CPU
  kernels can get there first: a fresh engine whose first prompt had 4 tokens died with
  SIGILL (a 5-token one took a torch path that asked, and everything after it worked).
  ``register`` asks up front, through torch's own helper. Elsewhere (no AMX, not x86, no
  torch) it does nothing.
* **Dying with the worker.** A process vLLM started for an engine (a multiprocessing
  child: the engine core, its executor's workers) asks Linux for SIGTERM, vLLM's orderly
  stop, once the process that started it is gone (``PR_SET_PDEATHSIG``), so that an engine
  never outlives its worker, however the worker ended (SIGKILL included). If that parent
  is already gone by then, it stops at once. A process that is not a multiprocessing
  child (the worker itself) is left alone: it has its own way to follow its parent
  (``kvmesh.cluster.local.exit_with_parent``). Linux only; elsewhere nothing happens.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal

PR_SET_PDEATHSIG = 1


def register() -> None:
    _init_amx()
    die_with_parent()


def _init_amx() -> None:
    try:
        import torch

        init_amx = getattr(torch.cpu, "_init_amx", None)
        if init_amx is not None:
            init_amx()
    except Exception:  # best effort: without it, only AMX machines are at risk
        pass


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """In a multiprocessing child: have ``sig`` sent to this process when its parent
    ends (at once, if it has already ended). True when set."""
    parent = multiprocessing.parent_process()
    if parent is None or not hasattr(os, "getppid"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    if os.getppid() != parent.pid:  # the parent ended before the request was made
        os.kill(os.getpid(), sig)
    return True
