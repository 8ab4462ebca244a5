"""The tick lake: Parquet partitions of trades and features on a local path or an ``s3://`` URI.

Layout (Hive-style, so any Parquet engine reads it; files starting with ``_`` are skipped by them)::

    <lake>/trades/date=YYYY-MM-DD/symbol=SYM/part-0.parquet      the day's valid trades of SYM
    <lake>/trades/date=YYYY-MM-DD/symbol=SYM/_quarantine.parquet rejected rows, each with its reason
    <lake>/trades/date=YYYY-MM-DD/symbol=SYM/_manifest.json      counts, content hash, source
    <lake>/trades/date=YYYY-MM-DD/_SUCCESS                       the day is complete (written last)
    <lake>/features/date=YYYY-MM-DD/part-0.parquet               one-minute bars and features
    <lake>/features/date=YYYY-MM-DD/_manifest.json

Every file is written whole or not at all: locally to a temporary name then renamed over the
target, on S3 as one PUT (an object is replaced atomically). Partition files have fixed names, so
re-writing a partition replaces it and never adds a second copy.

S3-compatible stores (MinIO, Ceph, ...) are reached through ``TICK_LAKE_S3_ENDPOINT`` (or
``AWS_ENDPOINT_URL``); credentials come from the usual ``AWS_*`` variables.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from pyarrow import fs as pafs

TRADES, FEATURES = "trades", "features"
# The trade partitions' contract, shared by whoever writes them (the importer, through
# ``Lake.write_trades``) and whoever reads them (the feature build, the training pipeline's
# validation): the columns, the manifest's schema version, and the largest share of a symbol's
# rows that may be quarantined before the day is unfit to train on (the default of the importer's
# --max-bad-share and of tick_model_training's max_bad_share parameter; tests check they agree).
TRADE_COLUMNS = frozenset({"ts", "symbol", "price", "size", "exchange", "conditions", "suspicious"})
SCHEMA_VERSION = 1
MAX_BAD_SHARE = 0.02

PART_FILE, QUARANTINE_FILE, MANIFEST_FILE, SUCCESS_FILE = (
    "part-0.parquet", "_quarantine.parquet", "_manifest.json", "_SUCCESS")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parquet_bytes(frame) -> bytes:
    """A Polars frame as the lake's Parquet (zstd, with statistics): the same frame, the same bytes."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd", statistics=True)
    return buffer.getvalue()


@dataclass
class PartitionReport:
    """What a trade partition's manifest says about it (plus the schema version and import time)."""

    day: str
    symbol: str
    rows_in: int
    rows: int
    bad_rows: int
    bad_share: float
    reasons: dict[str, int]
    sha256: str
    sources: list[str]
    synthetic: bool
    max_bad_share: float
    over_limit: bool = field(init=False)

    def __post_init__(self) -> None:
        self.over_limit = self.bad_share > self.max_bad_share

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Lake:
    """A lake root; all paths below are strings relative to the filesystem ``fs``."""

    uri: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, uri: str) -> Lake:
        if uri.startswith("s3://"):
            endpoint = os.environ.get("TICK_LAKE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
            scheme = "https" if endpoint and endpoint.startswith("https") else "http"
            filesystem = pafs.S3FileSystem(
                endpoint_override=endpoint.split("://", 1)[-1] if endpoint else None,
                scheme=scheme if endpoint else "https",
                region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
            return cls(uri, filesystem, uri.removeprefix("s3://").rstrip("/"))
        root = os.path.abspath(uri.removeprefix("file://"))
        return cls(uri, pafs.LocalFileSystem(), root)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    # -- paths -------------------------------------------------------------------------------
    def day_dir(self, kind: str, day: date) -> str:
        return f"{self.root}/{kind}/date={day.isoformat()}"

    def trade_dir(self, day: date, symbol: str) -> str:
        return f"{self.day_dir(TRADES, day)}/symbol={symbol}"

    def display(self, path: str) -> str:
        return f"s3://{path}" if not self.is_local else path

    # -- reading -----------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def read_json(self, path: str) -> dict[str, Any]:
        return json.loads(self.read_bytes(path))

    def days(self, kind: str) -> list[date]:
        """Days with a partition of ``kind`` (for trades: only complete days, with _SUCCESS)."""
        base = f"{self.root}/{kind}"
        if not self.exists(base):
            return []
        found = []
        for info in self.fs.get_file_info(pafs.FileSelector(base)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith("date="):
                day = date.fromisoformat(info.base_name.removeprefix("date="))
                marker = SUCCESS_FILE if kind == TRADES else MANIFEST_FILE
                if self.exists(f"{info.path}/{marker}"):
                    found.append(day)
        return sorted(found)

    def symbols(self, day: date) -> list[str]:
        base = self.day_dir(TRADES, day)
        if not self.exists(base):
            return []
        return sorted(i.base_name.removeprefix("symbol=")
                      for i in self.fs.get_file_info(pafs.FileSelector(base))
                      if i.type == pafs.FileType.Directory and i.base_name.startswith("symbol="))

    def day_ready(self, day: date) -> bool:
        return self.exists(f"{self.day_dir(TRADES, day)}/{SUCCESS_FILE}")

    # -- writing -----------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomically create or replace ``path``."""
        parent = path.rsplit("/", 1)[0]
        if not self.is_local:  # no folders on S3 (and no empty "folder/" marker objects)
            with self.fs.open_output_stream(path) as out:  # visible only once the upload completes
                out.write(data)
            return
        self.fs.create_dir(parent, recursive=True)
        staging = f"{parent}/.{uuid.uuid4().hex}.tmp"
        try:
            with open(staging, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(staging, path)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)

    def write_json(self, path: str, document: dict[str, Any]) -> None:
        self.write_bytes(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())

    def write_trades(self, day: date, symbol: str, good, quarantined, *, sources: list[str],
                     synthetic: bool, max_bad_share: float = MAX_BAD_SHARE) -> PartitionReport:
        """Write one (day, symbol) trade partition whole, replacing any earlier one: the valid rows
        (Polars, exactly ``TRADE_COLUMNS``, time-ordered), the quarantined rows beside them (each
        with its ``reason``), then the manifest. A partition over ``max_bad_share`` is written all
        the same, for inspection; its manifest says so. The day is complete only once
        :meth:`mark_day_complete` has run."""
        if set(good.columns) != TRADE_COLUMNS:
            raise ValueError(f"trade partition columns {good.columns}, expected {sorted(TRADE_COLUMNS)}")
        folder = self.trade_dir(day, symbol)
        data = parquet_bytes(good)
        self.write_bytes(f"{folder}/{PART_FILE}", data)
        if quarantined.height:
            self.write_bytes(f"{folder}/{QUARANTINE_FILE}", parquet_bytes(quarantined))
        else:
            self.delete(f"{folder}/{QUARANTINE_FILE}")
        reasons = (dict(sorted(quarantined.group_by("reason").len().iter_rows())) if quarantined.height
                   else {})
        rows_in = good.height + quarantined.height
        report = PartitionReport(
            day=day.isoformat(), symbol=symbol, rows_in=rows_in, rows=good.height,
            bad_rows=quarantined.height, bad_share=round(quarantined.height / rows_in, 6), reasons=reasons,
            sha256=sha256(data), sources=sources, synthetic=synthetic, max_bad_share=max_bad_share)
        self.write_json(f"{folder}/{MANIFEST_FILE}",
                        {**report.to_dict(), "schema_version": SCHEMA_VERSION,
                         "imported_at": datetime.now(UTC).isoformat(timespec="seconds")})
        return report

    def mark_day_complete(self, day: date) -> None:
        """Rewrite the day's _SUCCESS (last) with every symbol partition the day now holds."""
        symbols = {}
        for symbol in self.symbols(day):
            manifest = self.read_json(f"{self.trade_dir(day, symbol)}/{MANIFEST_FILE}")
            symbols[symbol] = {"sha256": manifest["sha256"], "synthetic": manifest["synthetic"]}
        self.write_json(f"{self.day_dir(TRADES, day)}/{SUCCESS_FILE}",
                        {"date": day.isoformat(), "symbols": symbols})

    def delete(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_file(path)

    def delete_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)


def version_of(parts: Iterable[tuple[str, str]], synthetic: bool) -> str:
    """One data version for a set of (name, content hash) pairs; synthetic data says so."""
    digest = sha256("\n".join(f"{n}={h}" for n, h in sorted(parts)).encode())[:16]
    return f"synthetic-{digest}" if synthetic else digest
