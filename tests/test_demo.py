"""The README's main command, ``kvmesh demo``: the whole cluster on this machine, six
prompts, a clean stop. Prompts that share a long prefix with an earlier one skip prefill
and load the prefix from the store."""

import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_its_prompts_and_stops_cleanly():
    proc = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "demo"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = re.findall(r"^\[(.+?)\] prompt (\d+) tokens, .*from store: prefill (\w+).*, decode (\d+) tokens$",
                       proc.stdout, re.MULTILINE)
    assert [label for label, *_ in lines] == [
        "short", "shared prefix #1", "shared prefix #2", "shared prefix #3", "other long",
        "other long, again"]
    by_label = {label: (int(n), prefill, int(decode)) for label, n, prefill, decode in lines}
    for label in ("shared prefix #2", "shared prefix #3", "other long, again"):
        n, prefill, from_store = by_label[label]
        assert prefill == "skipped" and from_store >= n - 64, (label, by_label[label])
    assert "demo finished; cluster stopped" in proc.stdout
    # A clean stop: no component's log ends with a traceback (vLLM's engine finalizer
    # used to fail in every worker when it ran during interpreter shutdown).
    logs = Path(re.search(r"\(logs in (.+?)\)", proc.stdout).group(1))
    for log in sorted(logs.glob("*.log")):
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "Exception ignored" not in text, (log.name, text[-2000:])
