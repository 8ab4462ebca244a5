"""Write the ``.env`` of docker-compose-mlops.yml from ``.env.example``, generating every secret.

    python tools/deploy_env.py                 # writes .env (mode 600); refuses to overwrite one
    python tools/deploy_env.py --output other.env

Every variable that ``.env.example`` leaves empty is a secret and gets a fresh random value
(``secrets`` module); the others are copied as they are. Nothing generated is printed.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / ".env.example"


def parse_env(text: str) -> dict[str, str]:
    """``KEY=value`` lines, in order (comments and blank lines skipped; no quoting needed here)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def generate(key: str) -> str:
    if key == "AIRFLOW_FERNET_KEY":  # what cryptography's Fernet.generate_key() returns
        return base64.urlsafe_b64encode(os.urandom(32)).decode()
    if key == "FLOWER_BASIC_AUTH":
        return f"flower:{secrets.token_urlsafe(24)}"
    return secrets.token_urlsafe(32)


def render(example: str) -> str:
    """``example`` with every empty value filled; comments and order kept."""
    lines = []
    for line in example.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and stripped.endswith("="):
            key = stripped[:-1]
            line = f"{key}={generate(key)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--output", type=Path, default=ROOT / ".env")
    parser.add_argument("--example", type=Path, default=EXAMPLE)
    parser.add_argument("--force", action="store_true", help="replace an existing file (new secrets!)")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.force:
        print(f"{args.output} exists; keeping it (--force replaces every secret in it)", file=sys.stderr)
        return 1
    content = render(args.example.read_text())
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(content)
    os.chmod(args.output, 0o600)
    generated = [k for k, v in parse_env(args.example.read_text()).items() if not v]
    print(f"wrote {args.output} with {len(generated)} generated secrets: {', '.join(generated)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
