"""Fetch official data files: from an offline mirror (``DATA_MIRROR``) or by download.

Downloads land in a cache under the data dir and are written atomically (temp file + rename), so
an interrupted download never leaves a half file that a later run would trust.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from scripts.core.errors import DataSourceError

log = logging.getLogger(__name__)


def fetch(relative_path: str, urls: list[str], cache_dir: Path, mirror: Path | None) -> Path:
    """Return a local path to the official file ``relative_path`` (mirror layout).

    Order: the mirror (if given: it is authoritative, a missing file there is an error), then the
    download cache, then each URL in turn.
    """
    if mirror is not None:
        candidate = mirror / relative_path
        if not candidate.is_file():
            raise DataSourceError(f"DATA_MIRROR={mirror} has no {relative_path}")
        log.info("reading %s from mirror %s", relative_path, mirror)
        return candidate
    cached = cache_dir / relative_path
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        try:
            log.info("downloading %s", url)
            fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=".part-")
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                shutil.copyfileobj(resp, out)
            os.replace(tmp, cached)
            return cached
        except OSError as exc:  # URLError is an OSError
            errors.append(f"{url}: {exc}")
            Path(tmp).unlink(missing_ok=True)
    raise DataSourceError(
        f"could not download {relative_path} ({'; '.join(errors)}); "
        "without internet set DATA_MIRROR to a folder holding the official files"
    )
