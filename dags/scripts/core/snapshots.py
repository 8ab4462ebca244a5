"""Immutable, content-addressed snapshots: a folder per data version, written once, atomically.

The data goes into a staging folder beside the target, the manifest last (its presence marks a
complete snapshot), then one ``rename`` publishes it. A snapshot that exists is never rewritten;
two writers racing with the same content both succeed and leave one folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"


def write_once(target: Path, manifest: Mapping[str, Any], write_data: Callable[[Path], None]) -> bool:
    """Publish ``target`` unless it exists; ``write_data(folder)`` writes the data files.

    Returns True when this call wrote it.
    """
    if (target / MANIFEST_FILE).is_file():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        write_data(staging)
        (staging / MANIFEST_FILE).write_text(json.dumps(dict(manifest), indent=2))
        try:
            os.rename(staging, target)
        except OSError:  # a concurrent writer got there first with identical content
            if not (target / MANIFEST_FILE).is_file():
                raise
            return False
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
