"""kvmesh's KV store: block keys, the block store, its server and client.

Nothing in this package imports from the rest of kvmesh.
"""
