"""Shared fixtures: the generated tiny model (once per test session) and the default real
model (converted once into the kvmesh cache)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import redis

from kvmesh.cluster.local import free_port

LAYERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        layer = next((part for part in item.path.parts if part in LAYERS), None)
        if layer is not None:
            item.add_marker(getattr(pytest.mark, layer))


def pytest_sessionfinish(session, exitstatus) -> None:
    from tests.colocated import ReferenceEngine

    ReferenceEngine.close_all()  # the colocated engines kept for the session


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The engines the tests start (every cluster's workers, which inherit this environment)
# run their model inside the engine-core process: vLLM's CPU platform otherwise gives a
# one-rank engine a worker process of its own, one more process importing vLLM (7 s of
# a core on the development machine) for each engine the suite starts. The modules that
# check the executor users run (disaggregation, the soak under load, Ray) ask for it with
# ``production_executor``; an engine of several ranks gets vLLM's multiprocessing
# executor either way. (Under concurrent load the one-process engine is slower: the
# soak's requests took 53 s against 31 s.)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="module")
def production_executor():
    """vLLM's default, multiprocessing engine (a worker process per rank) for the
    clusters a module starts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from kvmesh.cluster.models import make_model

    return str(make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0))


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """``family_model(size)``: the generated model ``size`` (``mqa``, ``mha``, ``sliding``,
    ``hybrid``, ``draft``; seed 0), made once per test session on first use."""
    from kvmesh.cluster.models import make_model

    made: dict[str, str] = {}
    root = tmp_path_factory.mktemp("family-models")

    def get(size: str) -> str:
        if size not in made:
            made[size] = str(make_model(root / size, size, seed=0))
        return made[size]
    return get


@pytest.fixture(scope="session")
def smollm2_model() -> str:
    """SmolLM2-135M-Instruct, the default model, from the kvmesh cache (converted on first
    use). Its source package missing is an error naming how to install it, never a skip."""
    from kvmesh.cluster.models import ensure_model

    return str(ensure_model("smollm2"))


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


def start_redis(log_path, port: int | None = None, *args: str) -> tuple[subprocess.Popen, int]:
    """A redis-server on loopback, on ``port`` or a free one, with extra ``args``; fails
    the test when it does not start."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH; install it (Debian/Ubuntu: "
                    "apt-get install -y redis-server)", pytrace=False)
    for _ in range(3 if port is None else 1):  # a free port may be taken before the server binds it
        bind = port or free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(bind), *args],
                                    stdout=log, stderr=subprocess.STDOUT)
        if _wait_ready(proc, bind, timeout_s=10.0):
            return proc, bind
        proc.kill()
        proc.wait(timeout=10)
    pytest.fail(f"redis-server did not start; its log:\n{log_path.read_text()}", pytrace=False)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("redis") / "redis.log"
    proc, port = start_redis(log_path, None, "--save", "", "--appendonly", "no")
    yield f"redis://127.0.0.1:{port}/0"
    proc.kill()
    proc.wait(timeout=10)


class OwnRedis:
    """A redis-server of one test's own, which the test may stop and start again on the
    same port. Its data lives in ``directory``: a ``stop(save=True)`` keeps it for the
    next start, a ``stop(save=False)`` (a kill) loses what was not saved."""

    def __init__(self, directory):
        self.directory = directory
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc, self.port = start_redis(self.directory / "redis.log", self.port,
                                           "--dir", str(self.directory), "--save", "",
                                           "--appendonly", "no")

    def stop(self, save: bool) -> None:
        if save:
            client = redis.Redis(port=self.port, socket_timeout=10)
            client.save()
            client.close()
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path)
    yield server
    server.close()
