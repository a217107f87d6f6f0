"""The kvmesh client SDK (gRPC, sync and asyncio).

It depends on the protocol package only, never on torch or vLLM. The serving API it
speaks is defined in ``kvmesh_proto``.
"""
