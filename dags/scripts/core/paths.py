"""Where things live on disk, read from the environment: one folder for all the stack writes
(``VTM_HOME``, default ``<repo>/.local``), the offline data mirror (``DATA_MIRROR``) and the tick
lake (``TICK_LAKE``). Standard library only; every layer may import it."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def home_dir() -> Path:
    return Path(os.environ.get("VTM_HOME", REPO_ROOT / ".local")).resolve()


def data_dir() -> Path:
    """Raw downloads and immutable data snapshots."""
    return Path(os.environ.get("VTM_DATA_DIR", home_dir() / "data")).resolve()


def data_mirror() -> Path | None:
    """An offline mirror of the official files (layout: ../shared/data/README.md), if set."""
    mirror = os.environ.get("DATA_MIRROR")
    return Path(mirror).resolve() if mirror else None


def tick_lake() -> str:
    """Root of the tick lake: a local path or an s3:// URI (TICK_LAKE, default <VTM_HOME>/lake)."""
    return os.environ.get("TICK_LAKE") or str(home_dir() / "lake")


def locks_dir() -> Path:
    return Path(os.environ.get("VTM_LOCK_DIR", home_dir() / "locks")).resolve()
