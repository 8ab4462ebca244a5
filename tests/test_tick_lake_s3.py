"""The tick lake on an ``s3://`` URI through an S3-compatible endpoint.

AWS S3 cannot be reached here, so the endpoint is moto's S3 server: a real HTTP server on
127.0.0.1 speaking the S3 REST API (a stand-in at that boundary, as a MinIO container is in the
compose deployment). The lake code under test talks to it through pyarrow's S3 filesystem exactly
as it would to MinIO or AWS.
"""

from __future__ import annotations

from datetime import date

import pytest

from scripts.tick import features as tick_features
from scripts.tick import importer as tick_import
from scripts.tick import lake as tick_lake
from scripts.tick import pipeline as tick_pipeline
from tests.helpers import free_port
from tests.test_tick_import import BAD, GOOD, day_of, write_csv

DAY = date(2013, 10, 8)


@pytest.fixture(scope="module")
def s3_endpoint():
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket="ticks")
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_lake(s3_endpoint, monkeypatch) -> str:
    monkeypatch.setenv("TICK_LAKE_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")  # the local server's fixed test credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    return "s3://ticks/lake"


def keys(endpoint: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket="ticks").get("Contents", []))


def test_import_validate_and_build_on_s3(s3_lake, s3_endpoint, tmp_path):
    source = write_csv(tmp_path / "day.csv", GOOD + [BAD["suspicious"]])
    (report,) = tick_import.import_files(s3_lake, [source])
    assert (report.rows, report.bad_rows) == (len(GOOD), 1)
    before = keys(s3_endpoint)
    assert before == ["lake/trades/date=2013-10-08/_SUCCESS",
                      "lake/trades/date=2013-10-08/symbol=IBM/_manifest.json",
                      "lake/trades/date=2013-10-08/symbol=IBM/_quarantine.parquet",
                      "lake/trades/date=2013-10-08/symbol=IBM/part-0.parquet"]
    (again,) = tick_import.import_files(s3_lake, [source])  # re-import replaces, adds nothing
    assert keys(s3_endpoint) == before and again.sha256 == report.sha256

    lake = tick_lake.Lake.open(s3_lake)
    assert lake.days(tick_lake.TRADES) == [DAY] and lake.symbols(DAY) == ["IBM"]
    assert tick_pipeline.partition_ready(day_of(s3_lake, DAY))
    assert tick_pipeline.validate(day_of(s3_lake, DAY, 0.5))["trades"] == len(GOOD)
    built = tick_features.build_day(s3_lake, DAY)
    assert built.uri == "s3://ticks/lake/features/date=2013-10-08/part-0.parquet"
    assert tick_features.build_day(s3_lake, DAY).sha256 == built.sha256
    assert tick_features.load_features(lake, [DAY]).height == tick_features.SESSION_MINUTES
