"""The commands README.md and docs/operations.md show, read from the files: every line of every
```bash block (continuation lines and multi-line quotes joined, comments dropped). What the suite
does with each is ``PLAN`` in tests/e2e/test_embedded_stack.py; a command missing there fails the
suite, so a new documented command cannot go untested."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ("README.md", "docs/operations.md")
FENCE = re.compile(r"^```(\w*)\s*$")
COMMENT = re.compile(r"\s+#\s.*$|^#.*$")


@dataclass(frozen=True)
class Command:
    document: str
    text: str  # as written, without its comment
    comment: str  # what the document says beside it

    @property
    def from_dags(self) -> bool:
        """The README marks the commands to run from ``dags/`` in their comment."""
        return "(from dags/)" in self.comment


def _complete(text: str) -> bool:
    """True when ``text`` is a whole shell command (no open quote, no trailing backslash)."""
    if text.endswith("\\"):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:  # No closing quotation
        return False
    return True


def commands(document: str) -> list[Command]:
    found: list[Command] = []
    in_bash, pending, comment = False, "", ""
    for line in (ROOT / document).read_text().splitlines():
        fence = FENCE.match(line)
        if fence:
            in_bash = not in_bash and fence.group(1) == "bash"
            continue
        if not in_bash or (not pending and (not line.strip() or line.lstrip().startswith("#"))):
            continue
        match = COMMENT.search(line) if _complete(pending + ("\n" if pending else "") + COMMENT.sub("", line)) else None
        if match:
            comment = match.group(0).strip()
            line = line[:match.start()]
        pending = f"{pending}\n{line}" if pending else line.rstrip()
        if _complete(pending):
            found.append(Command(document, pending.strip(), comment))
            pending, comment = "", ""
    assert not pending, f"{document}: unfinished command at the end of a block: {pending!r}"
    return found


def all_commands() -> list[Command]:
    return [command for document in DOCUMENTS for command in commands(document)]
