"""Write small files in the exact UCI household-power layout, for tests.

A plausible household: base load, morning and evening peaks, busier weekends, random appliance
bursts; scattered ``?`` minutes and one long outage, like the official file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

HEADER = ("Date;Time;Global_active_power;Global_reactive_power;Voltage;Global_intensity;"
          "Sub_metering_1;Sub_metering_2;Sub_metering_3")


def minute_frame(days: int, seed: int, start: str = "2007-01-01 17:24") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    stamps = pd.date_range(start, periods=days * 1440, freq="min")
    hour = stamps.hour.to_numpy() + stamps.minute.to_numpy() / 60
    weekend = stamps.dayofweek.to_numpy() >= 5
    profile = (0.35 + 1.1 * np.exp(-((hour - 7.5) ** 2) / 1.5) + 1.6 * np.exp(-((hour - 20) ** 2) / 4)
               + weekend * 0.5 * np.exp(-((hour - 13) ** 2) / 6))
    season = 1 + 0.25 * np.cos(2 * np.pi * stamps.dayofyear.to_numpy() / 365)
    bursts = (rng.random(len(stamps)) < 0.01) * rng.gamma(2.0, 1.0, len(stamps))
    bursts = np.convolve(bursts, np.ones(20), mode="same")  # an appliance runs ~20 minutes
    power = np.clip(profile * season + bursts + rng.normal(0, 0.08, len(stamps)), 0.08, None)
    return pd.DataFrame({
        "stamp": stamps, "gap": power, "grp": np.abs(rng.normal(0.12, 0.05, len(stamps))),
        "volt": rng.normal(240.5, 2.5, len(stamps)), "amp": power * 4.2,
        "s1": np.round(bursts * 2), "s2": np.round(rng.random(len(stamps)) < 0.05),
        "s3": np.round(np.clip(power * 6, 0, 19)),
    })


def format_lines(frame: pd.DataFrame, missing: np.ndarray) -> list[str]:
    dates = [f"{d.day}/{d.month}/{d.year}" for d in frame["stamp"]]
    times = frame["stamp"].dt.strftime("%H:%M:%S").tolist()
    lines = [HEADER]
    for i, row in enumerate(frame.itertuples(index=False)):
        if missing[i]:
            lines.append(f"{dates[i]};{times[i]};?;?;?;?;?;?;?")
        else:
            lines.append(f"{dates[i]};{times[i]};{row.gap:.3f};{row.grp:.3f};{row.volt:.2f};"
                         f"{row.amp:.1f};{row.s1:.3f};{row.s2:.3f};{row.s3:.0f}")
    return lines


def uci_lines(days: int = 120, seed: int = 1, start: str = "2007-01-01 17:24") -> list[str]:
    frame = minute_frame(days, seed, start)
    rng = np.random.default_rng(seed + 1)
    missing = rng.random(len(frame)) < 0.002
    outage_start = len(frame) // 2
    missing[outage_start: outage_start + 2 * 1440] = True  # a two-day outage
    return format_lines(frame, missing)


def write_uci_file(path: Path, days: int = 120, seed: int = 1, lines: list[str] | None = None) -> Path:
    """Write a zip (official layout) or, for a ``.txt`` path, the plain text file."""
    text = "\n".join(lines if lines is not None else uci_lines(days, seed)) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("household_power_consumption.txt", text)
    else:
        path.write_text(text)
    return path
