"""kvmesh's protocol: the .proto files and the stubs grpcio-tools generates from them.

Regenerate after editing a .proto file: ``python -m kvmesh_proto.generate``.
"""
