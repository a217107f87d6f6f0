"""Prefill workers: a vLLM engine that computes prompts' KV and saves it to the store.

It also loads prefixes the store already holds, so a shared prefix is computed once.
What makes it a KV producer is the connector's save side (``save_side``, ``step_saves``).
"""
