"""The synchronous kvmesh client.

    from kvmesh_client import Client
    with Client("127.0.0.1:50050") as client:
        print(client.generate("Hello", max_tokens=16, temperature=0).text)
        for chunk in client.stream("Hello", max_tokens=16):
            print(chunk.text, end="", flush=True)

Every call has one deadline (``timeout_s``: per call, or the options' when None; a
finite number of seconds above 0, else ValueError) covering all its attempts and, for a
stream, the whole stream; past it the call raises ``DeadlineExceeded``. UNAVAILABLE is
retried (``ClientOptions.retries``) only where the retry can start before the deadline,
and a stream only before its first response. A request over ``max_message_bytes`` raises
``InvalidArgument`` before anything is sent. Other failures raise the typed errors of
``kvmesh_client.errors``. Closing a stream early cancels the request on the server.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import grpc

from kvmesh_client.calls import Attempts, check_size
from kvmesh_client.channel import ClientOptions
from kvmesh_client.errors import from_rpc_error
from kvmesh_client.types import Chunk, Completion, Model, build_request, join, to_chunk
from kvmesh_proto import serving_pb2, serving_pb2_grpc


class Client:
    def __init__(self, target: str = "127.0.0.1:50050", options: ClientOptions | None = None, **kw):
        self.options = options or ClientOptions(**kw)
        creds = self.options.credentials()
        args = self.options.channel_args()
        self._channel = (grpc.secure_channel(target, creds, options=args) if creds
                         else grpc.insecure_channel(target, options=args))
        self._stub = serving_pb2_grpc.KVMeshStub(self._channel)

    def _unary(self, method, request, timeout_s):
        attempts = Attempts(self.options, timeout_s)
        check_size(request, self.options.max_message_bytes)
        while True:
            try:
                return method(request, timeout=attempts.time_left(),
                              metadata=self.options.metadata())
            except grpc.RpcError as e:
                time.sleep(attempts.backoff(from_rpc_error(e)))

    def stream(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
               **params) -> Iterator[Chunk]:
        """Stream an answer. ``params``: max_tokens, temperature, top_p, top_k, seed, stop,
        ignore_eos, model, cache_salt, request_id, session. ``timeout_s`` bounds the whole stream,
        from the first attempt (made on the first ``next``) to the last chunk. ValueError
        for a bad ``timeout_s`` and ``InvalidArgument`` for a request over the message
        limit are raised here, before iterating."""
        request = build_request(prompt, **params)
        attempts = Attempts(self.options, timeout_s)
        check_size(request, self.options.max_message_bytes)
        return self._stream(request, attempts)

    def _stream(self, request, attempts: Attempts) -> Iterator[Chunk]:
        while True:
            call = self._stub.Generate(request, timeout=attempts.time_left(),
                                       metadata=self.options.metadata())
            received = False
            try:
                for msg in call:
                    received = True
                    yield to_chunk(msg)
                return
            except grpc.RpcError as e:
                delay = attempts.backoff(from_rpc_error(e), retry=not received)
            finally:
                call.cancel()
            time.sleep(delay)

    def generate(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                 **params) -> Completion:
        """The whole answer at once (same parameters as ``stream``)."""
        return join(list(self.stream(prompt, timeout_s=timeout_s, **params)))

    def cancel(self, request_id: str, timeout_s: float | None = None) -> bool:
        return self._unary(self._stub.Cancel, serving_pb2.CancelRequest(request_id=request_id),
                           timeout_s).cancelled

    def health(self, timeout_s: float | None = None) -> dict:
        reply = self._unary(self._stub.Health, serving_pb2.HealthRequest(), timeout_s)
        return {"status": reply.status, "workers": dict(reply.workers)}

    def models(self, timeout_s: float | None = None) -> list[Model]:
        reply = self._unary(self._stub.ListModels, serving_pb2.ListModelsRequest(), timeout_s)
        return [Model(m.id, m.max_model_len) for m in reply.models]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
