"""The router: the OpenAI-compatible HTTP API and prefill/decode orchestration."""
