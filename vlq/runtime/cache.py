"""vlq's cache folder, one rule for every module that writes there (no vlq imports: errors and console use it)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$VLQ_CACHE_DIR``, else ``~/.cache/vlq``: the tiny model, error logs, ModelOpt's CUDA extension builds."""
    return Path(os.environ.get("VLQ_CACHE_DIR", Path.home() / ".cache" / "vlq"))
