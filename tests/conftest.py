"""Shared fixtures: the tiny model, generated once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import redis

from cluster.local import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from cluster.models import make_model

    return str(make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0))


def _wait_ready(proc: subprocess.Popen, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        client = redis.Redis(port=port, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            if client.ping():
                return True
        except redis.ConnectionError:
            time.sleep(0.05)
        finally:
            client.close()
    return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH; install it (Debian/Ubuntu: "
                    "apt-get install -y redis-server)", pytrace=False)
    log_path = tmp_path_factory.mktemp("redis") / "redis.log"
    for _ in range(3):  # the free port may be taken before the server binds it
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                 "--appendonly", "no"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        if _wait_ready(proc, port, timeout_s=10.0):
            break
        proc.kill()
        proc.wait(timeout=10)
    else:
        pytest.fail(f"redis-server did not start; its log:\n{log_path.read_text()}", pytrace=False)
    yield f"redis://127.0.0.1:{port}/0"
    proc.kill()
    proc.wait(timeout=10)
