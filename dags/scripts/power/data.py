"""UCI household power: fetch, validate, aggregate to hours, and write an immutable snapshot.

The official file is ``household_power_consumption.txt`` inside the UCI zip: one reading a minute,
``;``-separated, ``Date`` as d/m/yyyy, ``Time`` as hh:mm:ss, ``?`` for a missing reading. Any other
deviation (header, field count, a date, a number, a duplicate or backwards timestamp) stops the run
with a :class:`DataValidationError` naming the file and line: a model is never trained on a file
we only half understood. "A number" is a finite decimal: ``inf``, ``Infinity``, ``1e309`` (which
overflows to infinity) and ``nan`` are refused, because only ``?`` means missing. Each reading must
also lie in its physical range (:data:`LOWER_BOUNDS`): every quantity is ``>= 0``, the voltage
``> 0``. Line numbers are as an editor shows them: the header is line 1, blank lines count.

An hour's mean is kept only when at least ``MIN_MINUTES_PER_HOUR`` readings exist; otherwise the
hour is missing (NaN). Long outages therefore stay visible as gaps instead of being interpolated
into data that never existed; features and metrics skip them explicitly.

CLI: ``python -m scripts.power.data [--source FILE] [--out DIR]`` prints the snapshot as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import TypedDict

import numpy as np
import pandas as pd

from scripts.core import paths, snapshots
from scripts.core.errors import DataValidationError
from scripts.core.sources import fetch

log = logging.getLogger(__name__)

MIRROR_PATH = "household_power/household_power_consumption.zip"
OFFICIAL_URLS = [
    "https://archive.ics.uci.edu/static/public/235/individual+household+electric+power+consumption.zip",
]
MEMBER_NAME = "household_power_consumption.txt"
HEADER = [
    "Date", "Time", "Global_active_power", "Global_reactive_power", "Voltage",
    "Global_intensity", "Sub_metering_1", "Sub_metering_2", "Sub_metering_3",
]
NUMERIC = HEADER[2:]
# The documented meaning of each reading bounds it from below: power (kW), intensity (A) and the
# sub-meterings (Wh) are non-negative; the mains voltage (V) is positive. (lower bound, inclusive?)
LOWER_BOUNDS: dict[str, tuple[float, bool]] = {c: (0.0, True) for c in NUMERIC} | {"Voltage": (0.0, False)}
TARGET = "global_active_power"
MIN_MINUTES_PER_HOUR = 45
SNAPSHOT_FILE = "hourly.parquet"
MANIFEST_FILE = snapshots.MANIFEST_FILE


class Snapshot(TypedDict):
    """What ``prepare`` hands to later tasks through XCom (a JSON-ready dict): a location and a
    version, and what the manifest says of the data; never the data itself."""

    uri: str
    data_version: str
    rows: int
    start: str
    end: str
    missing_hours: int
    source: str


def read_source_bytes(path: Path) -> tuple[bytes, str]:
    """The text file's bytes, from the zip (official layout) or a plain ``.txt``."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.endswith(MEMBER_NAME)]
            if not members:
                raise DataValidationError(path, f"zip holds no {MEMBER_NAME}")
            return zf.read(members[0]), f"{path}!{members[0]}"
    if path.suffix == ".zip":
        raise DataValidationError(path, "not a readable zip file (truncated or corrupt?)")
    return path.read_bytes(), str(path)


def _check_field_counts(raw: bytes, name: str) -> np.ndarray:
    """Every line must have exactly 8 separators; pandas would pad a short line with NaN.

    Returns the 1-based line numbers of the non-blank lines (header first): pandas skips blank
    lines, so data row ``i`` of the frame is on line ``lines[i + 1]``.
    """
    buf = np.frombuffer(raw, dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    if len(buf) and buf[-1] != ord("\n"):
        newlines = np.append(newlines, len(buf))
    seps_before = np.concatenate(([0], np.cumsum(buf == ord(";"))))
    line_ends = newlines
    line_starts = np.concatenate(([0], newlines[:-1] + 1))
    counts = seps_before[line_ends] - seps_before[line_starts]
    blank = line_ends - line_starts <= 1  # empty line or lone "\r"
    bad = np.flatnonzero((counts != len(HEADER) - 1) & ~blank)
    if len(bad):
        line = int(bad[0]) + 1
        raise DataValidationError(
            name, f"expected {len(HEADER)} ';'-separated fields, found {int(counts[bad[0]]) + 1}",
            line=line,
        )
    return np.flatnonzero(~blank) + 1


def _field_text(raw: bytes, line: int, column: str) -> str:
    """The text of ``column`` on ``line`` (1-based), as written in the file; only for messages."""
    text = raw.split(b"\n", line)[line - 1].decode("utf-8", "replace")
    return text.rstrip("\r").split(";")[HEADER.index(column)]


def check_readings(values: np.ndarray, raw: bytes, name: str, lines: np.ndarray) -> None:
    """Every reading finite (NaN is a ``?``) and within its column's :data:`LOWER_BOUNDS`.

    One vectorised pass per rule over the whole file; only when a rule fails is the first offending
    row (in file order) located and its text read back for the message.
    """
    with np.errstate(invalid="ignore"):
        rules = [
            (np.isinf(values), "is not a finite number (only '?' marks a missing reading)"),
            (values < np.array([LOWER_BOUNDS[c][0] for c in NUMERIC]), None),
            ((values == np.array([LOWER_BOUNDS[c][0] for c in NUMERIC]))
             & ~np.array([LOWER_BOUNDS[c][1] for c in NUMERIC]), None),
        ]
    for bad, problem in rules:
        if not bad.any():
            continue
        row, col = (int(x[0]) for x in np.nonzero(bad))  # row-major: the first bad line, then field
        column = NUMERIC[col]
        line = int(lines[row + 1])
        if problem is None:
            bound, inclusive = LOWER_BOUNDS[column]
            problem = f"is {'negative' if inclusive else 'not positive'}: {column} must be " \
                      f"{'>=' if inclusive else '>'} {bound:g}"
        raise DataValidationError(name, f"{_field_text(raw, line, column)!r} {problem}",
                                  line=line, field=column)


def parse_minutes(raw: bytes, name: str) -> pd.DataFrame:
    """Validate and parse the minute file into a frame indexed by timestamp (NaN = ``?``)."""
    first_line = raw.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    if first_line.split(";") != HEADER:
        raise DataValidationError(name, f"header is {first_line!r}, expected {';'.join(HEADER)!r}",
                                  line=1)
    lines = _check_field_counts(raw, name)
    try:
        frame = pd.read_csv(io.BytesIO(raw), sep=";", na_values=["?"], keep_default_na=False,
                            dtype={c: "float64" for c in NUMERIC} | {"Date": str, "Time": str},
                            skip_blank_lines=True)
    except ValueError:
        # Only the slow path knows where: re-read as text and find the first bad number.
        frame = pd.read_csv(io.BytesIO(raw), sep=";", dtype=str, keep_default_na=False,
                            skip_blank_lines=True)
        for column in NUMERIC:
            text = frame[column].str.strip()
            numbers = pd.to_numeric(text.where(text != "?"), errors="coerce")
            bad = numbers.isna() & (text != "?")
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise DataValidationError(
                    name, f"{text.iloc[row]!r} is neither a number nor '?'", line=int(lines[row + 1]),
                    field=column) from None
        raise
    if frame.empty:
        raise DataValidationError(name, "no readings after the header")
    stamps = pd.to_datetime(frame["Date"] + " " + frame["Time"], format="%d/%m/%Y %H:%M:%S",
                            errors="coerce")
    bad = np.flatnonzero(stamps.isna().to_numpy())
    if len(bad):
        row = int(bad[0])
        raise DataValidationError(
            name, f"{frame['Date'].iloc[row]!r} {frame['Time'].iloc[row]!r} is not d/m/yyyy hh:mm:ss",
            line=int(lines[row + 1]), field="Date/Time")
    ns = stamps.to_numpy().astype("datetime64[ns]").astype(np.int64)
    step = np.diff(ns)
    if (step <= 0).any():
        row = int(np.flatnonzero(step <= 0)[0]) + 1
        kind = "duplicate timestamp" if step[row - 1] == 0 else "timestamp earlier than the line before"
        raise DataValidationError(name, f"{kind} {stamps.iloc[row]}", line=int(lines[row + 1]),
                                  field="Date/Time")
    values = frame[NUMERIC].astype("float64")
    check_readings(values.to_numpy(), raw, name, lines)
    values.columns = [c.lower() for c in NUMERIC]
    values.index = pd.DatetimeIndex(stamps, name="timestamp")
    return values


def to_hourly(minutes: pd.DataFrame, min_minutes: int = MIN_MINUTES_PER_HOUR) -> pd.DataFrame:
    """Hourly means over whole days; an hour with fewer than ``min_minutes`` readings is NaN."""
    grouped = minutes.resample("1h")
    hourly = grouped.mean()
    present = grouped[TARGET].count()
    hourly.loc[present < min_minutes, :] = np.nan
    hourly["n_minutes"] = present.astype("int16")
    # Keep whole days only: the first and last day of the file are usually partial.
    first = hourly.index[0].normalize()
    if hourly.index[0] != first:
        first += pd.Timedelta(days=1)
    last = hourly.index[-1].normalize()
    if hourly.index[-1] != last + pd.Timedelta(hours=23):
        last -= pd.Timedelta(days=1)
    hourly = hourly.loc[first: last + pd.Timedelta(hours=23)]
    if len(hourly) < 24:
        raise DataValidationError("hourly aggregate", "less than one whole day of readings")
    return hourly


def content_version(hourly: pd.DataFrame) -> str:
    """A hash of the values themselves (not of a file's bytes), stable across library versions."""
    digest = hashlib.sha256()
    digest.update(hourly.index.asi8.tobytes())
    for column in sorted(hourly.columns):
        digest.update(column.encode())
        digest.update(np.ascontiguousarray(hourly[column].to_numpy(dtype="float64")).tobytes())
    return "power-" + digest.hexdigest()[:16]


def write_snapshot(hourly: pd.DataFrame, root: Path, source: str) -> Snapshot:
    """Write the snapshot once: a version that already exists is reused, never rewritten."""
    version = content_version(hourly)
    target = root / version
    snapshot = Snapshot(uri=str(target), data_version=version, rows=len(hourly),
                        start=str(hourly.index[0]), end=str(hourly.index[-1]),
                        missing_hours=int(hourly[TARGET].isna().sum()), source=source)
    manifest = {k: v for k, v in snapshot.items() if k != "uri"}
    snapshots.write_once(target, manifest, lambda folder: hourly.to_parquet(folder / SNAPSHOT_FILE))
    return snapshot


def load_snapshot(uri: str) -> pd.DataFrame:
    hourly = pd.read_parquet(Path(uri) / SNAPSHOT_FILE)
    hourly.index = pd.DatetimeIndex(hourly.index, freq="h")
    return hourly


def prepare(source: Path | None = None, out_root: Path | None = None) -> Snapshot:
    """Fetch (mirror or download), validate, aggregate and snapshot the UCI file."""

    if source is None:
        source = fetch(MIRROR_PATH, OFFICIAL_URLS, paths.data_dir() / "raw", paths.data_mirror())
    out_root = out_root or paths.data_dir() / "power" / "snapshots"
    raw, name = read_source_bytes(Path(source))
    hourly = to_hourly(parse_minutes(raw, name))
    snapshot = write_snapshot(hourly, out_root, source=name)
    log.info("power snapshot %s: %d hours %s..%s (%d missing)", snapshot["data_version"],
             snapshot["rows"], snapshot["start"], snapshot["end"], snapshot["missing_hours"])
    return snapshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--source", type=Path, help="UCI zip or txt (default: mirror/download)")
    parser.add_argument("--out", type=Path, help="snapshot root (default: <data dir>/power/snapshots)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(prepare(args.source, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
