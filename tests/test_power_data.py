"""Loader and validation of the UCI household power file, on small files the tests write."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from scripts.core.errors import DataSourceError, DataValidationError
from scripts.power import data as power_data
from tests.helpers import serve_directory
from tests.uci_synth import HEADER, uci_lines, write_uci_file


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return uci_lines(days=3, seed=3)


def parse(tmp_path, lines, name="household_power_consumption.txt"):
    path = write_uci_file(tmp_path / name, lines=lines)
    raw, source = power_data.read_source_bytes(path)
    return power_data.parse_minutes(raw, source)


def test_parses_official_layout_with_question_marks(tmp_path, lines):
    minutes = parse(tmp_path, lines)
    assert len(minutes) == len(lines) - 1
    assert list(minutes.columns) == [c.lower() for c in power_data.NUMERIC]
    n_missing = sum(line.endswith("?;?;?;?;?;?;?") for line in lines)
    assert n_missing > 0
    assert int(minutes["global_active_power"].isna().sum()) == n_missing
    assert minutes.index.is_monotonic_increasing


def test_reads_zip_like_the_official_download(tmp_path, lines):
    path = write_uci_file(tmp_path / "household_power_consumption.zip", lines=lines)
    raw, source = power_data.read_source_bytes(path)
    assert source.endswith("!household_power_consumption.txt")
    assert len(power_data.parse_minutes(raw, source)) == len(lines) - 1


@pytest.mark.parametrize("mutate, line, message", [
    (lambda ls: ls.__setitem__(0, HEADER.replace("Voltage", "Volts")), 1, "header"),
    (lambda ls: ls.__setitem__(10, ls[10] + ";1.0"), 11, "expected 9"),
    (lambda ls: ls.__setitem__(12, ls[12].rsplit(";", 2)[0]), 13, "expected 9"),
    (lambda ls: ls.__setitem__(20, "2007-01-02" + ls[20][ls[20].index(";"):]), 21, "d/m/yyyy"),
    (lambda ls: ls.__setitem__(30, ls[30].replace(ls[30].split(";")[2], "1,25", 1)), 31,
     "neither a number"),
    (lambda ls: ls.__setitem__(40, ls[39]), 41, "duplicate timestamp"),
    (lambda ls: ls.__setitem__(50, ls[48]), 51, "earlier than the line before"),
], ids=["header", "extra-field", "missing-fields", "iso-date", "comma-decimal", "duplicate",
        "out-of-order"])
def test_broken_rows_name_file_and_line(tmp_path, lines, mutate, line, message):
    broken = [ln for ln in lines if not ln.endswith("?;?;?;?;?;?;?")]  # keep line numbers simple
    mutate(broken)
    with pytest.raises(DataValidationError) as err:
        parse(tmp_path, broken)
    assert err.value.line == line
    assert message in str(err.value)
    assert "household_power_consumption.txt" in str(err.value)


def test_negative_reading_is_rejected_with_its_field(tmp_path, lines):
    broken = [ln for ln in lines if not ln.endswith("?;?;?;?;?;?;?")]
    fields = broken[5].split(";")
    fields[4] = "-230.00"
    broken[5] = ";".join(fields)
    with pytest.raises(DataValidationError) as err:
        parse(tmp_path, broken)
    assert (err.value.line, err.value.field) == (6, "Voltage")


def with_field(lines: list[str], index: int, column: str, text: str) -> list[str]:
    """``lines`` (complete minutes only, so line numbers are simple) with one field replaced."""
    broken = [ln for ln in lines if not ln.endswith("?;?;?;?;?;?;?")]
    fields = broken[index].split(";")
    fields[HEADER.split(";").index(column)] = text
    broken[index] = ";".join(fields)
    return broken


@pytest.mark.parametrize("text", ["inf", "Infinity", "1e309", "-inf", "+INF", "-Infinity"])
def test_non_finite_reading_names_file_line_and_field(tmp_path, lines, text):
    """pandas reads these as +-infinity; only '?' may stand for a value that is not a number."""
    with pytest.raises(DataValidationError) as err:
        parse(tmp_path, with_field(lines, 700, "Global_active_power", text))
    assert (err.value.line, err.value.field) == (701, "Global_active_power")
    assert f"{text!r} is not a finite number" in str(err.value)
    assert str(err.value).startswith(str(tmp_path / "household_power_consumption.txt") + ", line 701, ")


@pytest.mark.parametrize("text", ["nan", "NaN", "NA", "", "null"])
def test_missing_markers_other_than_question_mark_are_refused(tmp_path, lines, text):
    with pytest.raises(DataValidationError, match="neither a number nor '\\?'") as err:
        parse(tmp_path, with_field(lines, 300, "Sub_metering_2", text))
    assert (err.value.line, err.value.field) == (301, "Sub_metering_2")


@pytest.mark.parametrize("column, text, problem", [
    ("Global_active_power", "-0.001", "is negative: Global_active_power must be >= 0"),
    ("Global_reactive_power", "-1", "is negative"),
    ("Global_intensity", "-4.2", "is negative: Global_intensity must be >= 0"),
    ("Sub_metering_1", "-1.000", "is negative"),
    ("Sub_metering_3", "-17", "is negative"),
    ("Voltage", "0", "is not positive: Voltage must be > 0"),
    ("Voltage", "0.00", "is not positive"),
])
def test_reading_outside_its_physical_range_names_its_field(tmp_path, lines, column, text, problem):
    with pytest.raises(DataValidationError) as err:
        parse(tmp_path, with_field(lines, 42, column, text))
    assert (err.value.line, err.value.field) == (43, column)
    assert f"{text!r} {problem}" in str(err.value)


def test_zero_power_and_sub_metering_are_valid(tmp_path, lines):
    """The bounds are the documented meaning: no consumption (0 kW, 0 Wh) is a real reading."""
    zeros = with_field(with_field(lines, 10, "Global_active_power", "0.000"), 11, "Sub_metering_1", "0")
    minutes = parse(tmp_path, zeros)
    assert minutes["global_active_power"].iloc[9] == 0.0


def test_first_bad_line_is_reported_and_blank_lines_count(tmp_path, lines):
    """Two bad readings: the earlier line is named. A blank line (pandas skips it) still counts as
    a line, so the number is the one an editor shows."""
    broken = with_field(lines, 900, "Voltage", "inf")
    broken = with_field(broken, 500, "Global_intensity", "1e309")
    broken.insert(100, "")
    with pytest.raises(DataValidationError) as err:
        parse(tmp_path, broken)
    assert (err.value.line, err.value.field) == (502, "Global_intensity")
    raw = (tmp_path / "household_power_consumption.txt").read_text().split("\n")
    assert "1e309" in raw[err.value.line - 1]


def test_truncated_zip_is_a_clear_error(tmp_path, lines):
    path = write_uci_file(tmp_path / "household_power_consumption.zip", lines=lines)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises((DataValidationError, zipfile.BadZipFile)) as err:
        power_data.read_source_bytes(path)
    assert "household_power_consumption.zip" in str(err.value) or isinstance(err.value, zipfile.BadZipFile)


def test_hourly_keeps_whole_days_and_leaves_outages_missing(tmp_path):
    lines = uci_lines(days=6, seed=5)
    minutes = parse(tmp_path, lines)
    # Blank out 3 hours of readings entirely and leave 20 minutes of a fourth.
    start = minutes.index.searchsorted(minutes.index[0].normalize() + np.timedelta64(2, "D"))
    minutes.iloc[start: start + 180, :] = np.nan
    minutes.iloc[start + 180: start + 220, :] = np.nan
    hourly = power_data.to_hourly(minutes)
    assert hourly.index[0].hour == 0 and hourly.index[-1].hour == 23
    assert len(hourly) % 24 == 0
    day_two = hourly.loc[minutes.index[start]:].iloc[:5]["global_active_power"]
    assert day_two.iloc[:4].isna().all(), "an hour with under 45 readings must stay missing"
    assert not np.isnan(day_two.iloc[4])


def test_snapshot_is_content_addressed_and_written_once(tmp_path, synthetic_uci):
    first = power_data.prepare(synthetic_uci, tmp_path / "snaps")
    manifest = tmp_path / "snaps" / first["data_version"] / power_data.MANIFEST_FILE
    mtime = manifest.stat().st_mtime_ns
    again = power_data.prepare(synthetic_uci, tmp_path / "snaps")
    assert again["data_version"] == first["data_version"]
    assert manifest.stat().st_mtime_ns == mtime, "an existing snapshot must not be rewritten"
    assert first["data_version"].startswith("power-")
    hourly = power_data.load_snapshot(first["uri"])
    assert len(hourly) == first["rows"] and first["missing_hours"] >= 48  # the two-day outage

    other = write_uci_file(tmp_path / "other.zip", days=120, seed=2)
    assert power_data.prepare(other, tmp_path / "snaps")["data_version"] != first["data_version"]


def test_mirror_without_the_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_MIRROR", str(tmp_path / "empty-mirror"))
    with pytest.raises(DataSourceError, match="household_power/household_power_consumption.zip"):
        power_data.prepare(None, tmp_path / "snaps")


def test_mirror_layout_is_read(tmp_path, monkeypatch, synthetic_uci):
    mirror = tmp_path / "mirror" / "household_power"
    mirror.mkdir(parents=True)
    (mirror / "household_power_consumption.zip").write_bytes(synthetic_uci.read_bytes())
    monkeypatch.setenv("DATA_MIRROR", str(tmp_path / "mirror"))
    snap = power_data.prepare(None, tmp_path / "snaps")
    assert snap["source"].startswith(str(mirror))


def test_download_when_no_mirror(tmp_path, monkeypatch, synthetic_uci):
    """With no mirror the official URL is fetched (here from a local HTTP server) and cached."""
    with serve_directory(synthetic_uci.parent) as url:
        monkeypatch.setattr(power_data, "OFFICIAL_URLS", [
            "http://127.0.0.1:9/unreachable.zip",  # first mirror down: the next one is tried
            f"{url}/{synthetic_uci.name}"])
        monkeypatch.setenv("VTM_DATA_DIR", str(tmp_path / "data"))
        snap = power_data.prepare(None, tmp_path / "snaps")
    cached = tmp_path / "data" / "raw" / power_data.MIRROR_PATH
    assert cached.read_bytes() == synthetic_uci.read_bytes()
    assert snap["source"].startswith(str(cached))
    assert not list(cached.parent.glob(".part-*")), "no partial download left behind"
