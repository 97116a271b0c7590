"""Where folio keeps what it derives from model sources (converted GGUF folders)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "FOLIO_CACHE_DIR"


def default_cache_dir() -> Path:
    """$FOLIO_CACHE_DIR if set, else ~/.cache/folio (not created here)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "folio"
