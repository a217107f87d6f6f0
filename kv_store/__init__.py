"""kvmesh's KV store: block keys, the block store, its server and client, and the vLLM connector.

Nothing in this package imports from the rest of kvmesh.
"""
