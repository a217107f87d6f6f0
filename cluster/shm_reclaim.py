"""Which POSIX shared-memory segments (``/dev/shm``) a process group holds, and freeing
the ones it left behind when it died.

A component's processes share a process group (its pid): the component and its engine's
processes. ``group_pids`` lists the live members of a group, ``held_segments`` the
segments some processes have mapped or open (their names, as in ``/dev/shm``); read them
while the group lives, since a dead process's memory maps are gone with it.

``reclaim`` unlinks the segments named ``kvmesh-<pid>-...`` after one of ``pids`` (a
store's host arena, ``kv_store.node.SHM_PREFIX``: its creator's, even while workers still
map it for zero-copy reads — unlinking takes only the name, their mappings stay valid and
the memory goes with the last of them), and those of the given names that no live
process has mapped or open (a dead worker's view of the store's arena is not its own). It
frees only what the calling user may unlink and never raises for a segment that is gone
or not ours; it returns the names it removed.
Reading ``/proc`` is racy by nature (a process may start or end meanwhile): a segment
created after the last look at a group, and not named after its pid, is missed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

SHM_DIR = Path("/dev/shm")
STORE_PREFIX = "kvmesh-"  # kv_store.node.SHM_PREFIX: kvmesh-<pid>-<random>


def all_pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _group_and_state(pid: int) -> tuple[int, str] | None:
    """(process group, state letter) of ``pid``, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
    return int(fields[2]), fields[0]


def group_pids(pgid: int) -> list[int]:
    """The live processes (zombies left out) whose process group is ``pgid``."""
    out = []
    for pid in all_pids():
        found = _group_and_state(pid)
        if found is not None and found[0] == pgid and found[1] not in ("Z", "X"):
            out.append(pid)
    return out


def _shm_name(path: str) -> str | None:
    prefix = f"{SHM_DIR}/"
    if not path.startswith(prefix) or path.endswith(" (deleted)"):
        return None
    return path[len(prefix):]


def held_segments(pids: Iterable[int]) -> set[str]:
    """Names of the ``/dev/shm`` segments that ``pids`` have mapped or open now (processes
    that are gone, or not readable by us, count as holding none)."""
    names: set[str] = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and (name := _shm_name(parts[5])):
                    names.add(name)
        except OSError:
            pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if name := _shm_name(os.readlink(f"/proc/{pid}/fd/{fd}")):
                    names.add(name)
            except OSError:
                pass
    return names


def named_after(pids: Iterable[int]) -> set[str]:
    """Segments in ``/dev/shm`` named after one of ``pids`` (``kvmesh-<pid>-...``)."""
    prefixes = tuple(f"{STORE_PREFIX}{pid}-" for pid in pids)
    try:
        return {n for n in os.listdir(SHM_DIR) if prefixes and n.startswith(prefixes)}
    except OSError:
        return set()


def reclaim(names: Iterable[str], pids: Iterable[int]) -> list[str]:
    """Unlink the segments named after ``pids`` and those of ``names`` that no live process
    holds; returns the names removed."""
    pids = set(pids)
    owned = named_after(pids)
    others = set(names) - owned
    if others:
        others -= held_segments(p for p in all_pids() if p not in pids)
    removed = []
    for name in sorted(owned | others):
        if "/" in name:
            continue
        try:
            os.unlink(SHM_DIR / name)
            removed.append(name)
        except OSError:  # gone already, or not ours
            pass
    return removed
