"""The synchronous kvmesh client.

    from kvmesh_client import Client
    with Client("127.0.0.1:50050") as client:
        print(client.generate("Hello", max_tokens=16, temperature=0).text)
        for chunk in client.stream("Hello", max_tokens=16):
            print(chunk.text, end="", flush=True)

Every call has a deadline (``timeout_s``, per call or from the options); failures raise
the typed errors of ``kvmesh_client.errors``. Closing a stream early cancels the request
on the server.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import grpc

from kvmesh_client.channel import RETRYABLE, ClientOptions
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
        for attempt in range(self.options.retries + 1):
            try:
                return method(request, timeout=timeout_s or self.options.timeout_s,
                              metadata=self.options.metadata())
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.options.retries:
                    raise from_rpc_error(e) from None
                time.sleep(self.options.retry_backoff_s * (2 ** attempt))

    def stream(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
               **params) -> Iterator[Chunk]:
        """Stream an answer. ``params``: max_tokens, temperature, top_p, top_k, seed, stop,
        ignore_eos, model, cache_salt, request_id."""
        request = build_request(prompt, **params)
        for attempt in range(self.options.retries + 1):
            call = self._stub.Generate(request, timeout=timeout_s or self.options.timeout_s,
                                       metadata=self.options.metadata())
            received = False
            try:
                for msg in call:
                    received = True
                    yield to_chunk(msg)
                return
            except grpc.RpcError as e:
                if received or e.code() not in RETRYABLE or attempt == self.options.retries:
                    raise from_rpc_error(e) from None
                time.sleep(self.options.retry_backoff_s * (2 ** attempt))
            finally:
                call.cancel()

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
