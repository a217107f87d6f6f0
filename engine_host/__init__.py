"""Hosts one vLLM engine (AsyncLLM) with the kvmesh connector behind the worker gRPC API.

``prefill_workers`` and ``decode_workers`` are this host configured for their role; the
engine, the API and the process life cycle are the same for both, so they live here once.
So does what both roles' connectors share: the facade vLLM loads (``connector``), its
scheduler side (``scheduler``), the worker side that orders loads and saves (``worker``),
the settings both sides read (``connector_settings``), the metadata they exchange
(``metadata``), and the paged-cache layout (``paged_layout``).
"""
