"""Decode workers: a vLLM engine that loads a prompt's KV from the store and generates.

Blocks the store cannot supply (missing, corrupt, late) are recomputed by the engine.
What makes it a KV consumer is the connector's load side (``load_side``, ``layer_loader``).
"""
