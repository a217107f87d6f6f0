"""Shared fixtures: the tiny model, generated once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from cluster.models import make_model

    return str(make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0))
