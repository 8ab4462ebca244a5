"""A real headless Chromium for the UI tests, from a package registry only.

Playwright (pinned in requirements-dev.txt) drives the browser, but its own browser download
comes from a CDN this project cannot assume. The npm registry carries a self-contained Linux
Chromium build, ``@sparticuz/chromium`` (made for serverless machines: the browser, the few
shared libraries a bare system lacks, SwiftShader for software rendering, and fonts, each
brotli-compressed). ``install()`` fetches that one pinned tarball over HTTPS, checks its sha512
against the integrity npm publishes (pinned below), and unpacks it into ``.venv/browser/``
(private, 0700); nothing is installed on the system. ``launch_options()`` is what
``playwright.chromium.launch(**...)`` needs.

    python tools/browser.py install     # done on demand by the tests that need it
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE, VERSION = "@sparticuz/chromium", "153.0.0"
TARBALL = f"https://registry.npmjs.org/{PACKAGE}/-/chromium-{VERSION}.tgz"
INTEGRITY = "sha512-jiGWqSvPMdu4+P9TilYqAR7yEGPEHINx+lCvE/NqNO/EHYzF/x1hUiI5T6ioVIt7dEy7n88byyT0vk+dnsgQwA=="
DEFAULT_DIR = ROOT / ".venv" / "browser"


class BrowserUnavailable(RuntimeError):
    """The pinned browser could not be fetched or unpacked; the message says why."""


def _download(url: str, attempts: int = 3) -> bytes:
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 - pinned https URL
                return response.read()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:  # transient: retry
            if attempt == attempts:
                raise BrowserUnavailable(f"could not download {url}: {exc}") from exc
            time.sleep(5 * attempt)
    raise AssertionError("unreachable")


def _check_integrity(data: bytes) -> None:
    algorithm, _, expected = INTEGRITY.partition("-")
    actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if actual != expected:
        raise BrowserUnavailable(f"{TARBALL}: {algorithm} {actual} is not the pinned {expected}")


def install(dest: Path = DEFAULT_DIR) -> Path:
    """The Chromium executable, unpacked under ``dest`` (fetched once; later calls reuse it)."""
    executable = dest / "chromium"
    marker = dest / f".installed-{VERSION}"
    if marker.is_file() and executable.is_file():
        return executable
    import brotli  # pinned in requirements-dev.txt; only this tool needs it

    data = _download(TARBALL)
    _check_integrity(data)
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as npm_package:
        members = {m.name: m for m in npm_package.getmembers()}
        for name in ("chromium", "al2023.tar", "swiftshader.tar", "fonts.tar"):
            member = members.get(f"package/bin/{name}.br")
            if member is None:
                raise BrowserUnavailable(f"{TARBALL} has no bin/{name}.br")
            unpacked = brotli.decompress(npm_package.extractfile(member).read())
            if name == "chromium":
                tmp = executable.with_suffix(".tmp")
                tmp.write_bytes(unpacked)
                tmp.chmod(0o700)
                tmp.replace(executable)
            else:
                target = dest / name.removesuffix(".tar")
                target.mkdir(mode=0o700, exist_ok=True)
                with tarfile.open(fileobj=io.BytesIO(unpacked)) as inner:
                    inner.extractall(target, filter="data")
    marker.write_text(TARBALL + "\n")
    return executable


def launch_options(dest: Path = DEFAULT_DIR) -> dict:
    """Keyword arguments for ``playwright.chromium.launch``."""
    executable = install(dest)
    libraries = [str(dest / "al2023" / "lib"), str(dest / "swiftshader")]
    env = {**os.environ, "FONTCONFIG_PATH": str(dest / "fonts"),
           "LD_LIBRARY_PATH": ":".join(libraries + [os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(":")}
    # No GPU and (as root) no sandbox: software rendering through SwiftShader.
    args = ["--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader", "--headless=shell"]
    return {"executable_path": str(executable), "env": env, "args": args, "headless": True}


def main(argv: list[str]) -> int:
    if argv[1:2] == ["install"]:
        print(install())
        return 0
    print("usage: browser.py install", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
