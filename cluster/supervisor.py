"""Keeping a local cluster's component processes running.

Contract. ``Supervisor.watch(process, start)`` puts one component under supervision:
``process.popen`` is its running process, the leader of a process group of its own (its
engine's processes are in that group), and ``start()`` starts it again exactly as before
(same flags, address and port) and returns the new ``Popen``. A watcher thread looks at
every component every ``poll_s``; when one has exited, however it ended:

1. the rest of its process group (e.g. a worker's vLLM EngineCore) is killed (SIGKILL)
   and waited for, at most ``KILL_WAIT_S``;
2. the ``/dev/shm`` segments its group was last seen holding, and those named after its
   processes, are unlinked unless a live process still holds them (``shm_reclaim``);
3. it is restarted after a delay that doubles with each restart inside the policy's
   window (``RestartPolicy.delay``), into the same ``Process`` object (``process.popen``
   is replaced; its log file is appended to);
4. unless that would be restart number ``max_restarts + 1`` within ``window_s``: then it is
   given up on — a line saying so goes to ``say``, its name and why land in ``failed``,
   ``gave_up`` is set, and it is not started again.

Supervision stops with ``stop()`` (before the cluster stops its processes, so that no
stop is taken for a crash); after it returns nothing is restarted. Whoever owns the
processes still stops them and closes their stdin; the supervisor closes the stdin of a
process it replaced. Errors from ``start()`` count as a death (the next try waits longer).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from kvmesh.cluster import shm_reclaim

KILL_WAIT_S = 10.0      # how long the dead component's group may take to go
SHM_LOOK_EVERY_S = 2.0  # how often a live group's /dev/shm segments are noted


@dataclass(frozen=True)
class RestartPolicy:
    """How often a component that died is started again."""

    max_restarts: int = 5      # restarts allowed within window_s; one more is giving up
    window_s: float = 300.0
    backoff_s: float = 1.0     # delay before the first restart in the window
    max_backoff_s: float = 30.0

    def delay(self, restarts: int) -> float:
        """Seconds to wait before restart number ``restarts`` (1-based) of the window."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, restarts - 1))


@dataclass
class _Watched:
    process: object                       # has .name, .popen, .log_path
    start: Callable[[], subprocess.Popen]
    restarts: deque = field(default_factory=deque)  # monotonic times of restarts in the window
    restart_at: float | None = None       # set while waiting to restart
    held: set = field(default_factory=set)  # /dev/shm names its group was seen holding
    pids: set = field(default_factory=set)  # processes seen in its group
    looked_at: float = 0.0


class Supervisor:
    def __init__(self, policy: RestartPolicy, say: Callable[[str], None] = print, poll_s: float = 0.5):
        self.policy = policy
        self.say = say
        self.poll_s = poll_s
        self.failed: dict[str, str] = {}   # name -> why it was given up on
        self.gave_up = threading.Event()
        self.restarted: dict[str, int] = {}  # name -> restarts so far, all time
        self._watched: list[_Watched] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, process, start: Callable[[], subprocess.Popen]) -> None:
        with self._lock:
            self._watched.append(_Watched(process, start))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvmesh-supervisor", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop supervising (waits for a restart under way, at most ``timeout_s``)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ the watcher

    def _run(self) -> None:
        while not self._stopping.wait(self.poll_s):
            with self._lock:
                for w in list(self._watched):
                    if self._stopping.is_set():
                        return
                    try:
                        self._check(w)
                    except Exception as e:  # never let one component stop supervision
                        self.say(f"supervising {w.process.name} failed: {e!r}")

    def _check(self, w: _Watched) -> None:
        now = time.monotonic()
        if w.restart_at is not None:
            if now >= w.restart_at:
                self._restart(w)
            return
        popen = w.process.popen
        if popen.poll() is None:
            if now - w.looked_at >= SHM_LOOK_EVERY_S:
                self._look(w, popen.pid)
            return
        self._clean_up(w, popen)
        self._schedule(w, f"exited with code {popen.returncode}")

    def _look(self, w: _Watched, pgid: int) -> None:
        pids = shm_reclaim.group_pids(pgid)
        w.pids.update(pids)
        w.held |= shm_reclaim.held_segments(pids)
        w.looked_at = time.monotonic()

    def _clean_up(self, w: _Watched, popen: subprocess.Popen) -> None:
        """Kill what is left of the dead component's group, then free its segments."""
        pgid = popen.pid
        self._look(w, pgid)  # the survivors' maps, while they still exist
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + KILL_WAIT_S
        while shm_reclaim.group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = shm_reclaim.group_pids(pgid)
        if left:
            self.say(f"{w.process.name}: processes {left} outlived SIGKILL for {KILL_WAIT_S:.0f}s")
        removed = shm_reclaim.reclaim(w.held, w.pids | {pgid})
        if removed:
            self.say(f"{w.process.name}: freed /dev/shm/{{{','.join(removed)}}}")
        if popen.stdin is not None:
            popen.stdin.close()
        w.held, w.pids = set(), set()

    def _schedule(self, w: _Watched, why: str) -> None:
        now = time.monotonic()
        while w.restarts and now - w.restarts[0] > self.policy.window_s:
            w.restarts.popleft()
        name = w.process.name
        if len(w.restarts) >= self.policy.max_restarts:
            reason = (f"{why}; it died {len(w.restarts) + 1} times within {self.policy.window_s:.0f}s, "
                      f"more than the {self.policy.max_restarts} restarts allowed")
            self.failed[name] = reason
            self._watched.remove(w)
            self.say(f"GIVING UP on {name}: {reason}; not restarting it (log: {w.process.log_path})")
            self.gave_up.set()
            return
        w.restarts.append(now)
        delay = self.policy.delay(len(w.restarts))
        w.restart_at = now + delay
        self.say(f"{name} {why}; restarting it in {delay:g}s "
                 f"(restart {len(w.restarts)} of {self.policy.max_restarts} allowed within "
                 f"{self.policy.window_s:.0f}s)")

    def _restart(self, w: _Watched) -> None:
        w.restart_at = None
        try:
            w.process.popen = w.start()
        except Exception as e:
            self._schedule(w, f"could not be started again ({e!r})")
            return
        w.looked_at = 0.0
        self.restarted[w.process.name] = self.restarted.get(w.process.name, 0) + 1
        self.say(f"{w.process.name} restarted (pid {w.process.popen.pid})")
