"""tools/backfill.create_backfill's retries, against a stand-in ``airflow`` CLI that answers the way
Airflow 3.3 does on a busy SQLite: a lock error that leaves an orphan backfill behind, then
"Another backfill is running" until the scheduler clears the orphan."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tools.backfill import create_backfill

FAKE_AIRFLOW = '''
import json, sys
from pathlib import Path
state = Path(sys.argv[1])
answers = json.loads(state.read_text())
answer = answers.pop(0)
state.write_text(json.dumps(answers))
with open(str(state) + ".calls", "a") as calls:
    calls.write(" ".join(sys.argv[2:]) + "\\n")
if answer == "ok":
    print("created backfill")
    sys.exit(0)
sys.stderr.write(answer + "\\n")
sys.exit(1)
'''
LOCKED = "sqlite3.OperationalError: database is locked"
ORPHAN = ("airflow.models.backfill.AlreadyRunningBackfill: Another backfill is running for Dag d. "
          "There can be only one running backfill per Dag.")


def fake_cli(tmp_path: Path, answers: list[str]) -> tuple[list[str], Path]:
    script, state = tmp_path / "fake_airflow.py", tmp_path / "answers.json"
    script.write_text(FAKE_AIRFLOW)
    state.write_text(json.dumps(answers))
    return [sys.executable, str(script), str(state)], Path(str(state) + ".calls")


def test_retries_through_the_orphan_its_own_lock_error_left(tmp_path):
    runner, calls = fake_cli(tmp_path, [LOCKED, ORPHAN, ORPHAN, "ok"])
    out = create_backfill("d", "2026-01-05", "2026-01-08", ["--reprocess-behavior", "completed"],
                          runner=runner, pause_s=0.01)
    assert out.strip() == "created backfill"
    lines = calls.read_text().splitlines()
    assert len(lines) == 4
    assert lines[0] == ("airflow backfill create --dag-id d --from-date 2026-01-05 --to-date 2026-01-08 "
                        "--max-active-runs 1 --reprocess-behavior completed")


def test_a_backfill_someone_else_runs_fails_at_once(tmp_path):
    runner, calls = fake_cli(tmp_path, [ORPHAN, "ok"])
    with pytest.raises(RuntimeError, match="after 1 attempt.*Another backfill is running"):
        create_backfill("d", "2026-01-05", "2026-01-08", runner=runner, pause_s=0.01)
    assert len(calls.read_text().splitlines()) == 1


def test_any_other_error_fails_at_once_and_a_deadline_bounds_the_retries(tmp_path):
    runner, _ = fake_cli(tmp_path, ["DagNotFound: Could not find dag d"])
    with pytest.raises(RuntimeError, match="DagNotFound"):
        create_backfill("d", "2026-01-05", "2026-01-08", runner=runner, pause_s=0.01)
    runner, calls = fake_cli(tmp_path, [LOCKED] * 50)
    with pytest.raises(RuntimeError, match="database is locked"):
        create_backfill("d", "2026-01-05", "2026-01-08", runner=runner, pause_s=0.01, deadline_s=0.3)
    assert 1 < len(calls.read_text().splitlines()) < 50
