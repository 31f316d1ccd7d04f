"""Shared fixtures. Only fixtures live here."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 model + tokenizer folder (seed 0, default sizes), built once per test session.

    Treat it as read-only: copy it before writing into it.
    """
    from swiftray.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    """The tokenizer of `tiny_model_dir`, loaded with AutoTokenizer (shared: do not modify it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
