"""The README's main command, ``kvmesh demo``: the whole cluster on this machine on the
default model (SmolLM2-135M-Instruct), real questions through the OpenAI chat API, a
clean stop. The answers must be right (greedy decoding), and questions after the first
load the shared system prompt from the store instead of computing it."""

import re
import subprocess
import sys
from pathlib import Path

# What each answer must mention: facts a 135M instruct model gets right, greedy.
EXPECTED = {
    "question 1": r"\bParis\b",
    "question 2": r"\bTokyo\b",
    "question 3": r"\b(8|eight)\b",
    "question 4": r"\bShakespeare\b",
    "conversation, turn 1": r"\bRome\b",
    "conversation, turn 2": r"\bItalian\b",  # "there" is Italy only if the first turn was read
}
ANSWER = re.compile(r"^\[(.+?)\] (.+)\n    (.+)\n    prompt (\d+) tokens, time to first token (\d+) ms, "
                    r"from store: prefill (\w+)(?: tokens)?, decode (\d+) tokens; "
                    r"decode's own prefix cache (\d+) tokens$", re.MULTILINE)


def test_demo_answers_real_questions_and_stops_cleanly(smollm2_model):
    proc = subprocess.run([sys.executable, "-m", "kvmesh.cluster.cli", "demo"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    answers = {label: (question, answer, int(n), prefill, int(decode) + int(local))
               for label, question, answer, n, _, prefill, decode, local in ANSWER.findall(proc.stdout)}
    assert list(answers) == list(EXPECTED), proc.stdout
    assert "smollm2-135m-instruct" in proc.stdout  # the default model, not a generated one
    for label, pattern in EXPECTED.items():
        question, answer, *_ = answers[label]
        assert re.search(pattern, answer, re.IGNORECASE), (label, question, answer)
        assert len(answer.split()) >= 4 and answer.isascii(), (label, answer)  # a sentence, not noise
    # The first question computes the shared system prompt; every later one finds it in
    # the store or the decode worker's own prefix cache (the follow-up turn included) and
    # computes at most 128 prompt tokens (the router's default for skipping prefill).
    assert answers["question 1"][3] != "skipped"
    for label in list(EXPECTED)[1:]:
        _, _, n, prefill, cached = answers[label]
        assert cached >= max(32, n - 128), (label, answers[label])
        if label.startswith("question"):
            assert prefill == "skipped", (label, answers[label])
    assert "demo finished; cluster stopped" in proc.stdout
    # A clean stop: no component's log ends with a traceback (vLLM's engine finalizer
    # used to fail in every worker when it ran during interpreter shutdown).
    logs = Path(re.search(r"\(logs in (.+?)\)", proc.stdout).group(1))
    for log in sorted(logs.glob("*.log")):
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "Exception ignored" not in text, (log.name, text[-2000:])
