"""Paths handed to actors."""

from __future__ import annotations

import os
from pathlib import Path


def absolute(path: str | Path) -> str:
    """Actors on a cluster joined by address do not share the driver's working directory:
    hand them absolute paths. A name that is not a local path is passed through."""
    return str(Path(path).resolve()) if os.path.exists(path) else str(path)
