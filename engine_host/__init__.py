"""Hosts one vLLM engine (AsyncLLM) with the kvmesh connector behind the worker gRPC API.

``prefill_workers`` and ``decode_workers`` are this host configured for their role; the
engine, the API and the process life cycle are the same for both, so they live here once.
"""
