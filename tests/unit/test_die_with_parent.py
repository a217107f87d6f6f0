"""``vllm_plugin.die_with_parent``: a multiprocessing child (as vLLM starts an engine core)
ends once the process that started it is SIGKILLed; a process that is no multiprocessing
child is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from kvmesh.engine_host.vllm_plugin import die_with_parent
from tests.waiting import wait_until

PARENT = textwrap.dedent("""
    import multiprocessing, sys, time

    def child(protect):
        from kvmesh.engine_host.vllm_plugin import die_with_parent
        if protect:
            die_with_parent()
        print(multiprocessing.current_process().pid, flush=True)
        time.sleep(60)

    if __name__ == "__main__":
        multiprocessing.get_context("spawn").Process(target=child, args=(sys.argv[1] == "1",)).start()
        time.sleep(60)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _child_after_parent_killed(tmp_path, protect: bool) -> tuple[int, bool]:
    script = tmp_path / "parent.py"  # a file: spawn's child imports the parent's main module
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), "1" if protect else "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
    except ValueError:
        parent.kill()
        raise
    time.sleep(0.2)
    parent.kill()
    parent.wait(10)
    return child, wait_until(lambda: not _alive(child), 5)


def test_a_child_that_asked_dies_with_its_parent(tmp_path):
    child, gone = _child_after_parent_killed(tmp_path, protect=True)
    assert gone, f"process {child} outlived its parent"


def test_a_child_that_did_not_ask_outlives_its_parent(tmp_path):
    """The negative control: without it, the child lives on (the orphaned engine)."""
    child, gone = _child_after_parent_killed(tmp_path, protect=False)
    try:
        assert not gone
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_no_multiprocessing_child_is_left_alone():
    assert die_with_parent() is False
