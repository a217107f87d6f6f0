"""A router under test: its HTTP API under uvicorn and its gRPC API, started as ``kvmesh
router`` starts them (``router_server``), with the tiny model's tokenizer, in front of
stub decode workers (``bench.stub_worker``: the worker gRPC API with no engine behind it),
all on loopback in this process."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from kvmesh.bench.stub_worker import StubWorker, start_stub
from kvmesh.cluster.local import free_port
from kvmesh.router.app import router_server
from kvmesh.router.core import RouterCore, RouterSettings


@dataclass
class Router:
    url: str
    grpc_address: str
    core: RouterCore
    stubs: list[StubWorker]
    stub_addresses: list[str]
    call: object  # call(coroutine) runs it on the router's event loop and returns its result
    app: object = None
    stub_servers: list = field(default_factory=list)  # each stub's gRPC server, None while stopped

    def stop_stub(self, i: int) -> None:
        """Stop stub ``i``'s server: its address refuses connections."""
        self.call(self.stub_servers[i].stop(None))
        self.stub_servers[i] = None

    def restart_stub(self, i: int) -> None:
        """Serve stub ``i`` again on its address."""
        host, port = self.stub_addresses[i].rsplit(":", 1)
        self.stub_servers[i], _ = self.call(start_stub("decode", host, int(port), stub=self.stubs[i]))

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0


@contextmanager
def serving(model: str, stubs: int = 1, token_delay_s: float = 0.0, discover: bool = False,
            max_model_len: int = 4096, prefill_delay_s: float | None = None, **settings):
    """A router serving on an event loop of its own (a thread), as ``router_server`` makes
    it (on a free port), with ``stubs`` stub decode workers of ``max_model_len`` tokens;
    given as its decode addresses unless ``discover`` (then the test announces them in the
    registry at ``settings["index"]``). With ``prefill_delay_s`` it has a stub prefill
    worker too, that takes that long before its token."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro, timeout_s: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    workers = [StubWorker("decode", max_model_len=max_model_len, token_delay_s=token_delay_s)
               for _ in range(stubs)]
    servers = [call(start_stub("decode", stub=w)) for w in workers]
    addresses = [address for _, address in servers]
    prefill = []
    if prefill_delay_s is not None:
        servers.append(call(start_stub("prefill", stub=StubWorker("prefill", max_model_len, prefill_delay_s))))
        prefill.append(servers[-1][1])
    stub_servers = [grpc_server for grpc_server, _ in servers]
    grpc_port = free_port()
    s = RouterSettings(model=model, served_model_name="tiny", prefill=tuple(prefill),
                       decode=() if discover else tuple(addresses), host="127.0.0.1", port=0,
                       grpc_port=grpc_port, **settings)
    server = router_server(s)
    app = server.config.app
    served = asyncio.run_coroutine_threadsafe(server.serve(), loop)
    deadline = time.monotonic() + 60
    while not server.started:
        assert not served.done() and time.monotonic() < deadline, "the router did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Router(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", app.state.core,
                     workers, addresses, call, app, stub_servers)
    finally:
        server.should_exit = True
        served.result(30)
        for grpc_server in stub_servers:  # as the test left them (stopped, restarted)
            if grpc_server is not None:
                call(grpc_server.stop(None))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def raw_request(url: str, path: str, body: bytes, headers: str = "") -> socket.socket:
    """An open connection that has sent a POST of ``body`` (with Content-Length)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n{headers}\r\n").encode() + body)
    return sock
