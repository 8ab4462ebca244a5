"""``airflow backfill create`` as an operator runs it, made dependable on the embedded stack's SQLite.

SQLite has one writer. While the scheduler works, creating a backfill can fail with "database is
locked" after the backfill row was already committed (Airflow commits it first, then creates the
runs). Airflow 3.3 removes that half-made backfill only for PostgreSQL's and MySQL's lock errors,
not SQLite's; the scheduler marks it complete about two minutes later, once it is known to have
no runs. Until then every new attempt fails with ``AlreadyRunningBackfill``. So: retry on the
lock error, and after one of our own attempts hit it, keep retrying through
``AlreadyRunningBackfill`` until the scheduler has cleared the orphan. Any other failure, or an
``AlreadyRunningBackfill`` we did not cause, fails at once. PostgreSQL needs none of this.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence

LOCKED = "database is locked"
ALREADY_RUNNING = "AlreadyRunningBackfill"


def create_backfill(dag_id: str, from_date: str, to_date: str, extra: Sequence[str] = (), *,
                    runner: Sequence[str] = (), env: Mapping[str, str] | None = None,
                    deadline_s: float = 900, pause_s: float = 5) -> str:
    """Create the backfill (runs one day at a time, in date order); returns the CLI's stdout.

    ``runner`` prefixes the command, e.g. a shell that first loads the stack's environment.
    """
    command = [*runner, "airflow", "backfill", "create", "--dag-id", dag_id, "--from-date", from_date,
               "--to-date", to_date, "--max-active-runs", "1", *extra]
    deadline = time.monotonic() + deadline_s
    lock_failed = False
    attempt = 0
    while True:
        attempt += 1
        done = subprocess.run(command, env=None if env is None else dict(env), capture_output=True,
                              text=True, timeout=300)
        if done.returncode == 0:
            return done.stdout
        locked = LOCKED in done.stderr
        our_orphan = lock_failed and ALREADY_RUNNING in done.stderr
        lock_failed = lock_failed or locked
        if not (locked or our_orphan) or time.monotonic() > deadline:
            raise RuntimeError(f"airflow backfill create --dag-id {dag_id} failed after {attempt} "
                               f"attempt(s): {done.stderr.strip()[-1500:]}")
        time.sleep(min(30.0, pause_s * attempt))
