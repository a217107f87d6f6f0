"""glibc settings for large buffers: with them, freed blocks are reused instead of being
handed back to the kernel and faulted in again (counted in page faults, not timed)."""

import os
import subprocess
import sys

PROGRAM = """
import resource, sys
from kvmesh.kv_store.malloc_tuning import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
buf = bytearray(1 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # eight 1 MiB blocks read back as bytes, then dropped
    data = [bytes(buf) for _ in range(8)]
    del data
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return int(out)


def test_tuned_process_reuses_freed_large_buffers():
    default, tuned = faults("default"), faults("tuned")
    assert tuned < 5000 < default, (tuned, default)  # 400 MiB faulted in is ~100,000 pages
