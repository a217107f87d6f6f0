"""Supervision of component processes (``cluster/supervisor.py``) on stand-in components:
small Python processes, each the leader of a process group, with a child process and
``/dev/shm`` segments, as a worker has its engine process and vLLM's segments."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmesh.cluster import shm_reclaim
from kvmesh.cluster.supervisor import RestartPolicy, Supervisor
from tests.waiting import wait_until

# The stand-in: maps its own segment and a shared one, forks a child that keeps both
# mapped (as an engine process does), writes "<pid> <child pid>" to its pid file.
COMPONENT = textwrap.dedent("""
    import mmap, os, sys, time
    own, shared, pid_file = sys.argv[1:4]
    maps = []
    for name, create in ((own, True), (shared, False)):
        fd = os.open("/dev/shm/" + name, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        os.ftruncate(fd, 4096)
        maps.append(mmap.mmap(fd, 4096))
        os.close(fd)
    child = os.fork()
    if child == 0:
        time.sleep(1000)
        os._exit(0)
    with open(pid_file + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child}")
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(1000)
""")


BACKOFF_S = 2.0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture
def shared_segment():
    """A segment this test process keeps mapped (someone else's, for the component)."""
    name = f"kvmesh-test-shared-{uuid.uuid4().hex[:8]}"
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 4096)
    held = mmap.mmap(fd, 4096)
    os.close(fd)
    yield name
    held.close()
    os.unlink(f"/dev/shm/{name}")


def test_a_dead_component_is_cleaned_up_and_restarted_with_the_same_command(tmp_path, shared_segment):
    """kill -9 of the leader alone: its child is killed, its own segment unlinked (the
    one another live process maps is kept), and it starts again with the same argv."""
    own = f"kvmesh-test-own-{uuid.uuid4().hex[:8]}"
    pid_file = tmp_path / "pids"
    argv = [sys.executable, "-c", COMPONENT, own, shared_segment, str(pid_file)]
    started = []

    def start():
        pid_file.unlink(missing_ok=True)
        started.append(subprocess.Popen(argv, process_group=0))
        return started[-1]

    lines = []
    supervisor = Supervisor(RestartPolicy(backoff_s=BACKOFF_S), lines.append, poll_s=0.1)
    proc = Proc("comp", start(), tmp_path / "comp.log")
    try:
        assert wait_until(pid_file.exists, 10)
        leader, child = map(int, pid_file.read_text().split())
        supervisor.watch(proc, start)
        assert wait_until(lambda: shm_reclaim.held_segments([child]) >= {own, shared_segment}, 5)
        os.kill(leader, signal.SIGKILL)  # the leader only: its child lives on, holding both
        # cleaned up before the restart is scheduled (which then comes BACKOFF_S later and
        # makes the same segment again)
        assert wait_until(lambda: any("restarting it in" in line for line in lines), 15), lines
        assert len(started) == 1
        assert not alive(child), "the dead component's child was left running"
        assert not os.path.exists(f"/dev/shm/{own}"), lines
        assert os.path.exists(f"/dev/shm/{shared_segment}"), "a segment another process maps was freed"
        assert wait_until(lambda: len(started) == 2, 15), lines
        assert proc.popen is started[1] and started[1].args == started[0].args
        assert wait_until(pid_file.exists, 10)  # the new one runs (and made its segment again)
        assert supervisor.restarted == {"comp": 1} and not supervisor.failed
        assert any("comp exited with code -9; restarting it in 2s" in line for line in lines), lines
    finally:
        supervisor.stop()
        for p in started:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        Path(f"/dev/shm/{own}").unlink(missing_ok=True)


def test_a_component_that_keeps_dying_is_given_up_on_loudly(tmp_path):
    """Restarts back off (doubling) and stop past the limit within the window: ``failed``
    names it, ``gave_up`` is set, a line says so, and it is not started again."""
    starts = []

    def start():
        starts.append(subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], process_group=0))
        return starts[-1]

    lines = []
    supervisor = Supervisor(RestartPolicy(max_restarts=2, window_s=60, backoff_s=0.2), lines.append, poll_s=0.05)
    supervisor.watch(Proc("flaky", start(), tmp_path / "flaky.log"), start)
    try:
        assert supervisor.gave_up.wait(20), lines
        assert len(starts) == 3  # the first start and two restarts
        assert "died 3 times" in supervisor.failed["flaky"]
        assert [line.split("; ")[1] for line in lines if "exited with code 3; restarting" in line] == [
            "restarting it in 0.2s (restart 1 of 2 allowed within 60s)",
            "restarting it in 0.4s (restart 2 of 2 allowed within 60s)"]
        assert any(line.startswith("GIVING UP on flaky: exited with code 3") for line in lines), lines
    finally:
        supervisor.stop()
        for p in starts:
            p.wait(5)
    assert len(starts) == 3


def test_backoff_doubles_up_to_its_cap():
    policy = RestartPolicy(backoff_s=1.0, max_backoff_s=5.0)
    assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_reclaim_frees_a_dead_stores_arena_even_while_others_map_it(tmp_path):
    """A store's arena is ``kvmesh-<pid>-<random>``: after the pid's death its name is
    freed though a live process (a worker, here this test) still maps it; a segment of
    unknown owner that a live process maps is kept, one nobody holds is freed."""
    dead_pid = 2 ** 22 + 17  # above any pid a test machine hands out: no live process
    tag = uuid.uuid4().hex[:6]
    arena, foreign, orphan = f"kvmesh-{dead_pid}-t{tag}", f"kvmesh-test-foreign-{tag}", f"kvmesh-test-orphan-{tag}"
    maps = []
    for name in (arena, foreign, orphan):
        Path(f"/dev/shm/{name}").write_bytes(b"x" * 4096)
    for name in (arena, foreign):
        with open(f"/dev/shm/{name}", "r+b") as f:
            maps.append(mmap.mmap(f.fileno(), 4096))
    try:
        assert shm_reclaim.reclaim([foreign, orphan], [dead_pid]) == sorted([arena, orphan])
        assert Path(f"/dev/shm/{foreign}").exists()
        assert not Path(f"/dev/shm/{arena}").exists() and not Path(f"/dev/shm/{orphan}").exists()
        assert maps[0][:1] == b"x"  # the mapping stays valid
    finally:
        for m in maps:
            m.close()
        for name in (arena, foreign, orphan):
            Path(f"/dev/shm/{name}").unlink(missing_ok=True)


def test_serve_exits_with_an_error_naming_a_component_given_up_on(monkeypatch):
    """``kvmesh serve`` supervises by default (``--max-restarts``), and once supervision
    gives up on a component it stops the cluster and exits non-zero, saying which and why."""
    import argparse

    from kvmesh.cluster import cli

    made = {}

    class GivenUp:
        failed = {"decode": "exited with code -9; it died 6 times within 300s"}
        stopped = False

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            GivenUp.stopped = True

        def wait_given_up(self, timeout_s=None):
            return True

    def cluster(args, **extra):
        made.update(extra)
        return GivenUp()

    monkeypatch.setattr(cli, "_cluster", cluster)
    monkeypatch.setattr(cli, "_print_endpoints", lambda c: None)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.cmd_serve(argparse.Namespace(port=8000, api_token=None, max_restarts=5))
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert made["restart"] == RestartPolicy(max_restarts=5) and GivenUp.stopped
    assert exit_.value.code == "kvmesh: stopped: decode exited with code -9; it died 6 times within 300s"
    parsed = cli.build_parser().parse_args(["serve"])
    assert parsed.max_restarts == 5


def test_serve_with_max_restarts_0_supervises_nothing_and_serves_until_interrupted(monkeypatch):
    import argparse
    import time

    from kvmesh.cluster import cli

    made = {}

    class Plain:
        failed = {}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def wait_given_up(self, timeout_s=None):  # what an unsupervised cluster answers
            return False

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cluster", lambda args, **extra: made.update(extra) or Plain())
    monkeypatch.setattr(cli, "_print_endpoints", lambda c: None)
    monkeypatch.setattr(time, "sleep", interrupted)  # the serving loop sleeps, never spins
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cli.cmd_serve(argparse.Namespace(port=8000, api_token=None, max_restarts=0))  # Ctrl-C: a clean stop
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert made["restart"] is None
