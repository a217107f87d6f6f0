"""Servers freeze their start-up objects: full collections stop walking them, and what is
made afterwards is still collected (counted in objects, not timed)."""

import json
import subprocess
import sys

PROGRAM = """
import gc, json
import numpy  # noqa: F401  (start-up objects, as a server has)
from kvmesh.kv_store.gc_tuning import freeze_startup_objects
before = len(gc.get_objects())
frozen = freeze_startup_objects()
walked = len(gc.get_objects())  # what a full collection still walks
class Node:
    pass
node = Node()
node.me = node  # garbage in a cycle, made after the freeze
del node
print(json.dumps({"before": before, "frozen": frozen, "walked": walked, "collected": gc.collect()}))
"""


def test_freeze_takes_startup_objects_out_of_collections():
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    got = json.loads(out)
    assert got["frozen"] >= 0.9 * got["before"] > 0
    assert got["walked"] < 0.01 * got["before"]
    assert got["collected"] >= 1  # later garbage is still freed
