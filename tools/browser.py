"""A real headless Chromium for the UI tests (tests/e2e/test_approval.py::test_approve_in_a_real_browser_promotes), from pinned
Debian packages, installed into the project's own environment.

Playwright (pinned in requirements-dev.txt) drives the browser, but its own browser download comes
from a CDN this project cannot assume. Debian 12 ships Chromium's headless shell as a package
(``chromium-headless-shell``). ``install()`` fetches it and the shared libraries it needs (the
Depends closure, less the base libraries every Debian system has: ``BASE``) from the Debian
mirror, checks each ``.deb`` against the sha256 pinned in ``PACKAGES`` (the archive's signed
index lists the same digests), and unpacks them with Python (ar + tar; no root, no dpkg, no
apt) into ``.venv/browser/`` (private, 0700). Nothing is installed on the system. A font
(DejaVu) comes along for the screenshots. ``launch_options()`` is what
``playwright.chromium.launch(**...)`` needs.

    python tools/browser.py install   # `make browser` (a prerequisite of `make test`): ~105 MB
    python tools/browser.py pin       # on Debian 12 with apt lists: print a new PACKAGES block

Debian removes a version's files from the mirror some time after a newer one replaces it (a
Chromium security update, every few weeks). ``install`` then fails with "404"; run ``pin`` (after
``apt-get update``) and commit the new block. VTM_DEB_MIRRORS (space-separated base URLs) names
other mirrors, e.g. a snapshot.debian.org address that still holds the pinned versions.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / ".venv" / "browser"
MIRRORS = ("https://deb.debian.org/debian", "https://deb.debian.org/debian-security")
# The browser, a font for screenshots, and two libraries it dlopen()s (no package depends on them).
TOP = ("chromium-headless-shell", "fonts-dejavu-core", "libwayland-client0", "libxcb-shm0")
# On every Debian system (essential packages and apt's own libraries); version-tied to its libc.
BASE = frozenset("""gcc-12-base libc6 libgcc-s1 libstdc++6 zlib1g libzstd1 liblzma5 liblz4-1
    libselinux1 libpcre2-8-0 libblkid1 libmount1 libudev1 libsystemd0 libcap2 libgcrypt20
    libgpg-error0 libmd0""".split())
SKIP = frozenset({"x11-utils", "xdg-utils"})  # chromium-common's desktop helpers: not for headless
# `python tools/browser.py pin` wrote this (Debian 12 "bookworm", amd64): pool path, sha256.
PACKAGES = """
pool/main/a/at-spi2-core/at-spi2-common_2.46.0-5_all.deb 441bc1c6cefdc01f519310abf55823deb868898480dee09a05aa44e8c83cabc2
pool/main/c/chromium/chromium-common_150.0.7871.100-1~deb12u1_amd64.deb 31326f6b71ce20a52e7bea9792bf7135d4ff802e1cdbc250960b1b46729998d2
pool/main/c/chromium/chromium-headless-shell_150.0.7871.100-1~deb12u1_amd64.deb a6d195a93c6d4ee6ea17e99a183d52bd49599138f395a5c861a29ac592e081ee
pool/main/d/debconf/debconf_1.5.82_all.deb 74ab14194a3762b2fc717917dcfda42929ab98e3c59295a063344dc551cd7cc8
pool/main/f/fontconfig/fontconfig-config_2.14.1-4_amd64.deb 281c66e46b95f045a0282a6c7a03b33de0e9a08d016897a759aaf4a04adfddbe
pool/main/f/fonts-dejavu/fonts-dejavu-core_2.37-6_all.deb 8892669e51aab4dc56682c8e39d8ddb7d70fad83c369344e1e240bf3ca22bb76
pool/main/a/alsa-lib/libasound2_1.2.8-1+b1_amd64.deb 44c77b076a7b11ae99712439022d822245b1994c435da564ebd320bb676faf4c
pool/main/a/alsa-lib/libasound2-data_1.2.8-1_all.deb fe0780d2d3674b2977e0acb0d48b448ad72ba1642564b7dc537f55e839984c2d
pool/main/liba/libasyncns/libasyncns0_0.8-6+b3_amd64.deb cadaff99f4178b1f580331045621b363abaaefc994e78eecba1857774a3cead2
pool/main/a/at-spi2-core/libatk1.0-0_2.46.0-5_amd64.deb 909dd661e03760a9ba1529bfc772f259cec8431999ee38b7c5521186237cdd98
pool/main/a/at-spi2-core/libatspi2.0-0_2.46.0-5_amd64.deb 1c0332f3b712a8e5ee56800bbcab83a8f92098874094f2b0bdfd6b7fd45e8b83
pool/main/b/brotli/libbrotli1_1.0.9-2+b6_amd64.deb 563b4caec1aa5e876bd3355b36e7a38e1484baf5a293b48d1e8bd22db786e4d7
pool/main/libb/libbsd/libbsd0_0.11.7-2_amd64.deb bb31cc8b40f962a85b2cec970f7f79cc704a1ae4bad24257a822055404b2c60b
pool/main/d/dav1d/libdav1d6_1.0.0-2+deb12u1_amd64.deb 197f08108242177aeae4c04aac11825c39b7d18598191ab769f910687ccb387f
pool/main/d/dbus/libdbus-1-3_1.14.10-1~deb12u1_amd64.deb 18ee0ce5fab9f7b671e87da1e9fa18660e36e04a3402f24bdb8635e0ba1d35f6
pool/main/d/double-conversion/libdouble-conversion3_3.2.1-1_amd64.deb 802b880ed900e4a8d54bab77b7551a7f3408b04891c3e5650fdc2368cc1fbc0a
pool/main/libd/libdrm/libdrm-common_2.4.114-1_all.deb 32f9664138b38b224383c6986457d5ad2ec8efd559b1a0ce7749405f7a451aad
pool/main/libd/libdrm/libdrm2_2.4.114-1+b1_amd64.deb be18fb670797ba32da9628cf3e8acd83160d8db8c8dd842501dd8e401c3b5371
pool/main/e/expat/libexpat1_2.5.0-1+deb12u2_amd64.deb 2255e62fc22a86d2c544b8a3f516da9aee19383ad5742722ab4ce7f66a30dbc8
pool/main/libf/libffi/libffi8_3.4.4-1_amd64.deb 6d9f6c25c30efccce6d4bceaa48ea86c329a3432abb360a141f76ac223a4c34a
pool/main/f/flac/libflac12_1.4.2+ds-2_amd64.deb 4d8431c274eef13ec9ee2c0bf988c34b4342367dec053b7f69a432525be5b1fe
pool/main/f/fontconfig/libfontconfig1_2.14.1-4_amd64.deb 16ee38d374e064f534116dc442b086ef26f9831f1c0af7e5fb4fe4512e700649
pool/main/f/freetype/libfreetype6_2.12.1+dfsg-5+deb12u4_amd64.deb 8043e479f73f29992d652e3f9dfe8b17f9780c7ea6330afe379ec5f9f188ac44
pool/main/m/mesa/libgbm1_22.3.6-1+deb12u2_amd64.deb 4323840f2b7b3e108990848529125d99c0956ae5a854c1e0568ed08c8faeaa2e
pool/main/g/glib2.0/libglib2.0-0_2.74.6-2+deb12u9_amd64.deb 7ff85197685d89e150e342b29a59aab1beee400050ba7da73de81cd999ffee5a
pool/main/g/graphite2/libgraphite2-3_1.3.14-1+deb12u1_amd64.deb c19a7f6ba9298db7eef041ae27b08985f2c02009e418063f8bccdb5bc5e858dc
pool/main/h/harfbuzz/libharfbuzz-subset0_6.0.0+dfsg-3_amd64.deb 020de1eeba5fb56052a6ca71b259f8cbe3f6fce5038f4caca751c7e4867ca33f
pool/main/h/harfbuzz/libharfbuzz0b_6.0.0+dfsg-3_amd64.deb bfce132b7ee67b9c2d2166075b1936a25c8cc6866b6a049f99b8e94baa916e71
pool/main/libj/libjpeg-turbo/libjpeg62-turbo_2.1.5-2_amd64.deb 95ec30140789a342add8f8371ed018924de51b539056522b66f207b25cba9cad
pool/main/m/minizip/libminizip1_1.1-8+deb12u1_amd64.deb b2999b980cbb9e6dcaa2d5154c9d1f1b9d55f5a0ca8166699de7ab47afaf4a36
pool/main/l/lame/libmp3lame0_3.100-6_amd64.deb b1292c749172e7623547ecf684da57d3ec6ca22109f08b11bbb9e6be6e6beb95
pool/main/m/mpg123/libmpg123-0_1.31.2-1+deb12u1_amd64.deb a10ad0d59995b859797a5f20d2833672051d0b2c7dab4c71f2e79258b2e3f631
pool/main/n/nspr/libnspr4_4.35-1_amd64.deb 6cca09767e94e4b5d2888ef31ad797bd3e7cec27fbbe98b49b10d4884746ce77
pool/main/n/nss/libnss3_3.87.1-1+deb12u2_amd64.deb bb4339de2e76be9862225447c6c24b9d759baba5ee861d86dfb558ebf4474d14
pool/main/libo/libogg/libogg0_1.3.5-3_amd64.deb f67acb0477aed0354f411172e37af338f3ac6bd4f3766134a2cf5539884b5a28
pool/main/o/openh264/libopenh264-7_2.3.1+dfsg-3+deb12u2_amd64.deb d453c4d81b7b3ff14663da75471250a4894543ae5ab5e902e225aca56aec56e8
pool/main/o/opus/libopus0_1.3.1-3_amd64.deb c172e212f9039e741916aa8e12f3670d1e049dc0c16685325641288c2d83faa7
pool/main/libp/libpng1.6/libpng16-16_1.6.39-2+deb12u5_amd64.deb a56d64bfaa9da12aafb83347909e62e6fd5fd251e6b34c194065911a30359978
pool/main/p/pulseaudio/libpulse0_16.1+dfsg1-2+b1_amd64.deb 7b2c5403cb726312219aad678becc6d6adcee1d8694fdffce0b6ec15ae010831
pool/main/libs/libsndfile/libsndfile1_1.2.0-1+deb12u1_amd64.deb 02dc3f08fe8476e82e005f412e3b7289ff641180f33a9be8073f4bde61c85e8e
pool/main/s/sqlite3/libsqlite3-0_3.40.1-2+deb12u2_amd64.deb a8d78b40e9b4e422224aeebfe0e4dfc243f6acf3532490b0c05480d4283d41e2
pool/main/libv/libvorbis/libvorbis0a_1.3.7-1_amd64.deb 01c14f9d1109650077a4c5c337c285476a6932d4d448f5a190c2b845724dbf21
pool/main/libv/libvorbis/libvorbisenc2_1.3.7-1_amd64.deb 75dd4d6f904c7db82f5112e60d8efea9e81dfedf94e970c5da7af2b3d81643c0
pool/main/w/wayland/libwayland-client0_1.21.0-1_amd64.deb 1f002d028b8b79eec9847c636d8886d10dfe8c884cc2bebe18086b1391c5a28d
pool/main/w/wayland/libwayland-server0_1.21.0-1_amd64.deb df0396221d7b794496a687ec61fae82b6465648bc0ab6501ba0a5ed7f56eb8d6
pool/main/libx/libx11/libx11-6_1.8.4-2+deb12u2_amd64.deb d88c973e79fd9b65838d77624142952757e47a6eb1a58602acf0911cf35989f4
pool/main/libx/libx11/libx11-data_1.8.4-2+deb12u2_all.deb 987a848aeb1c358e4186368871b0526f10bb14c6b53214ab3bf8b69abb830191
pool/main/libx/libx11/libx11-xcb1_1.8.4-2+deb12u2_amd64.deb f5da45e1d881a793250a96613f28c471a248877f1a0f18a5c90e2a620a76c898
pool/main/libx/libxau/libxau6_1.0.9-1_amd64.deb 679db1c4579ec7c61079adeaae8528adeb2e4bf5465baa6c56233b995d714750
pool/main/libx/libxcb/libxcb-shm0_1.15-1_amd64.deb c1afcef29dc78b95c475159b181b28b1dedaf1d5aa06efd2fa6d90c73bfbe0e5
pool/main/libx/libxcb/libxcb1_1.15-1_amd64.deb fdc61332a3892168f3cc9cfa1fe9cf11a91dc3e0acacbc47cbc50ebaa234cc71
pool/main/libx/libxcomposite/libxcomposite1_0.4.5-1_amd64.deb 4c26ebf519d2ebc22fc1416dee45e12c4c4ef68aa9b2ed890356830df42b652a
pool/main/libx/libxdamage/libxdamage1_1.1.6-1_amd64.deb fcdf7e4c29b307ba8711c864e1e646d76315a8f55121198143653e56592fa8a7
pool/main/libx/libxdmcp/libxdmcp6_1.1.2-3_amd64.deb ecb8536f5fb34543b55bb9dc5f5b14c9dbb4150a7bddb3f2287b7cab6e9d25ef
pool/main/libx/libxext/libxext6_1.3.4-1+b1_amd64.deb 504b7be9d7df4f6f4519e8dd4d6f9d03a9fb911a78530fa23a692fba3058cba6
pool/main/libx/libxfixes/libxfixes3_6.0.0-2_amd64.deb 1cd616396ff2ecae77e6e8b5b7695d414f0146de2d147837a2a02165f99e1a2c
pool/main/libx/libxi/libxi6_1.8-1+b1_amd64.deb 6c2fb5f241b311788990122c6e693915867cd8ed9d6da2e3524aec7ed3cdb4c0
pool/main/libx/libxkbcommon/libxkbcommon0_1.5.0-1_amd64.deb e3fe045b9a33a101de1c5a912a4a10928db055c3f68930f47eccbb44d7c7d54e
pool/main/libx/libxnvctrl/libxnvctrl0_525.85.05-3~deb12u1_amd64.deb 6fc26e4b6069f4648692e0c225f580161e3b0c04e4bac1c616c8a418a9a9817d
pool/main/libx/libxrandr/libxrandr2_1.5.2-2+b1_amd64.deb e2e10b672085ddf1d294cd689ed21bde5899325fd13626c2614b7d7b2d49a808
pool/main/libx/libxrender/libxrender1_0.9.10-1.1_amd64.deb b2a6d160578f359220101947c8d67059b44704a251e688de1d0b744fefedfd1a
pool/main/x/xkeyboard-config/xkb-data_2.35.1-1_all.deb 28a79c61b785f403da93af58c39aed13c022032935e3e54362c6707169cfe982
"""


class BrowserUnavailable(RuntimeError):
    """The pinned browser could not be fetched or unpacked; the message says why."""


def _packages() -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in PACKAGES.strip().splitlines()]


def _download(path: str, sha256: str, attempts: int = 3) -> bytes:
    mirrors = os.environ.get("VTM_DEB_MIRRORS", "").split() or MIRRORS
    errors = []
    for base in mirrors:
        url = f"{base.rstrip('/')}/{path}"
        for attempt in range(1, attempts + 1):
            try:
                with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 - pinned by sha256
                    data = response.read()
            except urllib.error.HTTPError as exc:  # 404: not (or no longer) on this mirror
                errors.append(f"{url}: HTTP {exc.code}")
                break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:  # transient: retry
                if attempt == attempts:
                    errors.append(f"{url}: {exc}")
                else:
                    time.sleep(3 * attempt)
                continue
            actual = hashlib.sha256(data).hexdigest()
            if actual == sha256:
                return data
            errors.append(f"{url}: sha256 {actual} is not the pinned {sha256}")
            break
    hint = ("; Debian may have replaced this version: run `python tools/browser.py pin` on Debian 12 "
            "after `apt-get update` and commit the new PACKAGES block, or set VTM_DEB_MIRRORS")
    raise BrowserUnavailable("could not fetch a pinned browser package: " + "; ".join(errors) + hint)


def _data_tar(deb: bytes, name: str) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an ar archive) as an open tar file."""
    if not deb.startswith(b"!<arch>\n"):
        raise BrowserUnavailable(f"{name} is not a Debian package")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos:pos + 60]
        member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        pos += 60
        if member.startswith("data.tar"):
            if member.endswith(".zst"):
                raise BrowserUnavailable(f"{name}: zstd-compressed data is not supported")
            return tarfile.open(fileobj=io.BytesIO(deb[pos:pos + size]), mode="r:*")
        pos += size + (size % 2)
    raise BrowserUnavailable(f"{name} has no data.tar member")


def _unpack(deb: bytes, name: str, dest: Path) -> None:
    with _data_tar(deb, name) as tar:
        for member in tar:
            if member.name.startswith(("./usr/share/doc", "./usr/share/man", "./usr/share/lintian")):
                continue
            try:
                tar.extract(member, dest, filter="data")
            except tarfile.FilterError:  # e.g. a link out of the tree; none a library needs
                continue


def _fonts_conf(dest: Path) -> str:
    return f"""<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "urn:fontconfig:fonts.dtd">
<fontconfig>
  <dir>{dest}/root/usr/share/fonts</dir>
  <dir>/usr/share/fonts</dir>
  <cachedir>{dest}/fontconfig-cache</cachedir>
  <include ignore_missing="yes">{dest}/root/etc/fonts/conf.d</include>
</fontconfig>
"""


def install(dest: Path = DEFAULT_DIR) -> Path:
    """The headless Chromium, unpacked under ``dest`` (fetched once; later calls reuse it)."""
    pins = hashlib.sha256(PACKAGES.encode()).hexdigest()[:16]
    marker = dest / ".installed"
    executable = dest / "root/usr/lib/chromium/chromium-headless-shell"
    if marker.is_file() and marker.read_text().strip() == pins and executable.is_file():
        marker.touch()  # up to date: tells make (its target) so
        return executable
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise BrowserUnavailable(f"the pinned packages are for Linux x86_64, not {sys.platform} {platform.machine()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))  # 0700
    try:
        for path, sha256 in _packages():
            _unpack(_download(path, sha256), path.rsplit("/", 1)[-1], staging / "root")
        if not (staging / "root/usr/lib/chromium/chromium-headless-shell").is_file():
            raise BrowserUnavailable("the pinned packages hold no usr/lib/chromium/chromium-headless-shell")
        (staging / "fonts.conf").write_text(_fonts_conf(dest))
        (staging / ".installed").write_text(pins + "\n")
        shutil.rmtree(dest, ignore_errors=True)  # an older install, whatever it held
        staging.replace(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return executable


def launch_options(dest: Path = DEFAULT_DIR) -> dict:
    """Keyword arguments for ``playwright.chromium.launch``."""
    executable = install(dest)
    libraries = [str(dest / "root" / d) for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu",
                                                   "usr/lib/x86_64-linux-gnu/pulseaudio")]
    env = {**os.environ, "FONTCONFIG_FILE": str(dest / "fonts.conf"),
           "LD_LIBRARY_PATH": ":".join([*libraries, os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(":")}
    # No setuid sandbox helper here (and user namespaces are often off in containers); the browser
    # only opens the test's own stack on 127.0.0.1.
    return {"executable_path": str(executable), "env": env, "args": ["--no-sandbox"], "headless": True}


def _apt_show(package: str) -> dict[str, str]:
    out = subprocess.run(["apt-cache", "show", "--no-all-versions", package], capture_output=True,
                         text=True, check=True).stdout
    fields = {}
    for line in out.split("\n\n")[0].splitlines():
        if not line.startswith(" ") and ": " in line:
            key, value = line.split(": ", 1)
            fields[key] = value
    return fields


def pin() -> str:
    """A PACKAGES block for the candidate versions of this machine's apt lists (Debian 12, amd64)."""
    seen: dict[str, dict[str, str]] = {}
    todo = list(TOP)
    while todo:
        package = todo.pop()
        if package in seen or package in BASE or package in SKIP:
            continue
        seen[package] = fields = _apt_show(package)
        for alternatives in filter(None, ", ".join(
                filter(None, (fields.get("Pre-Depends"), fields.get("Depends")))).split(", ")):
            todo.append(alternatives.split(" | ")[0].split()[0].split(":")[0])
    return "".join(f"{seen[p]['Filename']} {seen[p]['SHA256']}\n" for p in sorted(seen))


def main(argv: list[str]) -> int:
    if argv[1:2] == ["install"]:
        started = time.monotonic()
        try:
            executable = install()
        except BrowserUnavailable as exc:
            print(f"browser.py: {exc}", file=sys.stderr)
            return 1
        print(f"{executable} ({time.monotonic() - started:.0f} s)")
        return 0
    if argv[1:2] == ["pin"]:
        print(pin(), end="")
        return 0
    print("usage: browser.py install | pin", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
