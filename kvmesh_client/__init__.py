"""The kvmesh client SDK: a synchronous and an asyncio client of the router's gRPC API.

It depends on grpcio and the protocol package only: no torch, no vLLM.

    from kvmesh_client import Client
    with Client("127.0.0.1:50050", token=None) as client:
        print(client.generate("Hello", max_tokens=16, temperature=0).text)
"""

from kvmesh_client.aio import AsyncClient
from kvmesh_client.channel import ClientOptions
from kvmesh_client.client import Client
from kvmesh_client.errors import (Cancelled, DeadlineExceeded, InvalidArgument, KvmeshError,
                                  NotFound, Overloaded, Unauthenticated, Unavailable)
from kvmesh_client.types import Chunk, Completion, Model, Usage

__all__ = ["AsyncClient", "Cancelled", "Chunk", "Client", "ClientOptions", "Completion",
           "DeadlineExceeded", "InvalidArgument", "KvmeshError", "Model", "NotFound",
           "Overloaded", "Unauthenticated", "Unavailable", "Usage"]
