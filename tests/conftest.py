"""Fixtures shared by every test.

Tests never reach a model hub: offline mode is set before transformers is imported. The
bundled SmolLM2 is converted into a cache folder inside the repo (gitignored) that outlives
the test run, so only the first run on a checkout pays for the conversion.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.openmp import set_openmp_waits

REPO_ROOT = Path(__file__).resolve().parents[1]

# Bounded OpenMP spinning (shared/openmp.py): read when torch loads, so set it first.
set_openmp_waits()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FOLIO_CACHE_DIR", str(REPO_ROOT / ".folio-cache"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a Hugging Face folder (float32 safetensors)."""
    from services.executor.loader import resolve_model

    return resolve_model("smollm2-135m-instruct").path


@pytest.fixture(scope="module")
def redis_url():
    """A private redis-server (unix socket, no persistence) for one test module."""
    from shared.redis_server import start_private_redis

    server = start_private_redis()
    yield server.url
    server.stop()
