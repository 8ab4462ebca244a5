"""Reliability 2: data that is wrong but parses.

2.1 One ``inf`` (or ``Infinity``, ``1e309``) in ``Global_active_power`` of the UCI file: ``prepare``
    fails naming file, line and field; nothing is snapshotted, logged or registered, and the
    champion stays where a clean run put it (end to end: ``dag.test()`` against a real MLflow
    server), and every spelling is refused by the loader.
2.2 A vendor trade file of 200,000 rows with 2 unreadable times: the 2 rows are quarantined as
    ``unparseable_time``, the rest imported, and the day passes the DAG's validation; a non-finite
    or non-positive price or size is quarantined too, never written as a trade.
2.3 Image labels outside the class range (an IDX label byte 10..255) or not integers (a float in a
    CIFAR batch, which ``int64`` would truncate) fail ``prepare`` naming the file and field, and
    no snapshot is written.
"""

from __future__ import annotations

import gzip
import shutil
from datetime import date
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest

from common import config, mlflow_utils, registry
from scripts.core.errors import DataValidationError
from scripts.image import data as image_data
from scripts.image import idx
from scripts.power import data as power_data
from scripts.tick import importer as tick_import
from scripts.tick import lake as tick_lake
from scripts.tick import pipeline as tick_pipeline
from tests.helpers import dags_for_dag_test
from tests.test_image_data import idx_bytes, write_cifar_python, write_mnist
from tests.test_tick_import import HEADER as TICK_HEADER
from tests.test_tick_import import day_of, many_rows
from tests.uci_synth import HEADER as UCI_HEADER
from tests.uci_synth import uci_lines, write_uci_file

ROOT = Path(__file__).resolve().parents[2]
POWER = config.get("power_lgbm_training")
SMALL = {"eval_weeks": 2, "validation_weeks": 2, "num_boost_round": 300,
         "auto_promote": True}  # promoted unattended: dag.test() has nobody to approve
GAP = UCI_HEADER.split(";").index("Global_active_power")


def with_reading(lines: list[str], text: str, column: int = GAP) -> tuple[list[str], int]:
    """``lines`` with the reading of ``column`` on one complete minute (in the second half of the
    file, past the first outage-free weeks) replaced by ``text``; returns its 1-based line."""
    index = next(i for i in range(len(lines) * 2 // 3, len(lines)) if not lines[i].endswith("?"))
    fields = lines[index].split(";")
    fields[column] = text
    return [*lines[:index], ";".join(fields), *lines[index + 1:]], index + 1


# ---------------------------------------------------------------------------------------------
# 2.1 UCI power file with a non-finite reading
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_lines() -> list[str]:
    return uci_lines(days=120, seed=1)  # the lines of the session's synthetic_uci file


@pytest.mark.reliability(case="2.1 UCI inf (loader)",
                         fault="inf / Infinity / 1e309 / -inf / nan in a UCI reading",
                         survives="prepare fails naming file, line, field; no snapshot written")
@pytest.mark.parametrize("text", ["inf", "Infinity", "1e309", "-inf", "nan"])
def test_non_finite_reading_fails_prepare_and_writes_no_snapshot(tmp_path, clean_lines, text):
    lines, line = with_reading(clean_lines, text)
    source = write_uci_file(tmp_path / "household_power_consumption.zip", lines=lines)
    with pytest.raises(DataValidationError) as err:
        power_data.prepare(source, tmp_path / "snaps")
    assert (err.value.line, err.value.field) == (line, "Global_active_power")
    assert str(err.value).startswith(f"{source}!household_power_consumption.txt, line {line}, "
                                     "field 'Global_active_power': ")
    assert repr(text) in str(err.value)
    assert not (tmp_path / "snaps").exists()


def _power_state() -> dict[str, object]:
    """What a failed run must not change: MLflow runs of the experiment, model versions, champion."""
    client = mlflow_utils.configure()
    experiment = client.get_experiment_by_name(POWER.experiment)
    runs = mlflow.search_runs(experiment_ids=[experiment.experiment_id], output_format="list",
                              run_view_type=mlflow.entities.ViewType.ALL) if experiment else []
    versions = client.search_model_versions(f"name = '{POWER.model_name}'")
    try:
        champion = client.get_model_version_by_alias(POWER.model_name, registry.CHAMPION).version
    except mlflow.exceptions.MlflowException:
        champion = None
    return {"runs": sorted(r.info.run_id for r in runs), "versions": sorted(v.version for v in versions),
            "champion": champion}


@pytest.mark.e2e
@pytest.mark.reliability(case="2.1 UCI inf",
                         fault="one inf in Global_active_power after a clean run made a champion",
                         survives="prepare fails naming file, line, field; nothing logged or "
                                  "registered; champion unchanged")
def test_inf_in_uci_file_fails_prepare_and_leaves_the_champion(airflow_db, mlflow_server, synthetic_uci,
                                                              clean_lines, tmp_path, monkeypatch, capsys):
    dag = dags_for_dag_test().dags[POWER.dag_id]
    mirror_file = tmp_path / "mirror" / power_data.MIRROR_PATH
    mirror_file.parent.mkdir(parents=True)
    shutil.copy(synthetic_uci, mirror_file)
    monkeypatch.setenv("DATA_MIRROR", str(tmp_path / "mirror"))
    snapshots = tmp_path / "data" / "power" / "snapshots"
    monkeypatch.setenv("VTM_DATA_DIR", str(tmp_path / "data"))

    clean = dag.test(run_conf=SMALL)
    assert clean.state == "success"
    before = _power_state()
    assert before["champion"] is not None, "the clean run (or an earlier one) made a champion"
    snapshots_before = sorted(p.name for p in snapshots.iterdir())

    lines, line = with_reading(clean_lines, "inf")
    write_uci_file(mirror_file, lines=lines)
    capsys.readouterr()
    bad = dag.test(run_conf=SMALL)
    task_log = capsys.readouterr().out  # dag.test() runs the tasks in-process, logging to stdout

    assert bad.state == "failed"
    tis = {ti.task_id: ti for ti in bad.get_task_instances()}
    assert tis["prepare"].state == "failed" and tis["prepare"].try_number == 1, "bad data is not retried"
    assert all(tis[t].state != "success" for t in ("train", "evaluate", "register"))
    where = f"household_power_consumption.txt, line {line}, field 'Global_active_power': 'inf' is not a finite"
    assert where in task_log, task_log[-3000:]
    assert _power_state() == before, "no MLflow run, no model version, champion unchanged"
    assert sorted(p.name for p in snapshots.iterdir()) == snapshots_before, "no snapshot written"


# ---------------------------------------------------------------------------------------------
# 2.2 Tick importer: unreadable times and non-finite prices are quarantined per row
# ---------------------------------------------------------------------------------------------

DAY = date(2013, 10, 8)


@pytest.mark.reliability(case="2.2 tick unreadable times",
                         fault="2 rows with unreadable times in a 200,000-row vendor file",
                         survives="the 2 rows quarantined as unparseable_time with file and line; "
                                  "the rest imported; the day passes validation")
def test_two_unreadable_times_in_200k_rows_are_quarantined(tmp_path, capsys):
    rows = many_rows(200_000)
    rows[77_000] = "IBM,2013-10-08 9:30 AM,185.10,100,N,1,0"
    rows[199_999] = "IBM,,185.10,100,N,1,0"
    source = tmp_path / "trades_2013-10-08.csv.gz"
    source.write_bytes(gzip.compress(("\n".join([TICK_HEADER, *rows]) + "\n").encode()))
    lake = str(tmp_path / "lake")

    assert tick_import.main(["--lake", lake, "import", str(source)]) == 0, capsys.readouterr().err

    part = tmp_path / "lake" / "trades" / f"date={DAY}" / "symbol=IBM"
    quarantine = pl.read_parquet(part / tick_lake.QUARANTINE_FILE)
    assert quarantine.select("source", "line", "reason").rows() == [
        (source.name, 77_002, "unparseable_time"), (source.name, 200_001, "unparseable_time")]
    assert pl.read_parquet(part / tick_lake.PART_FILE).height == 199_998
    validated = tick_pipeline.validate(day_of(lake, DAY, 0.02))
    assert (validated["trades"], validated["quarantined"]) == (199_998, 2)


@pytest.mark.reliability(case="2.2 tick non-finite price",
                         fault="price inf / Infinity / 1e309 / nan / -1, size 1e309 / 0 in a trade row",
                         survives="row quarantined (unparseable_price/_size, non_positive_*); "
                                  "no such trade in the lake")
def test_non_finite_or_non_positive_trades_never_reach_the_lake(tmp_path):
    rows = many_rows(1_000)
    broken = {100: ("price", "inf"), 200: ("price", "Infinity"), 300: ("price", "1e309"),
              400: ("price", "nan"), 500: ("price", "-1"), 600: ("size", "1e309"), 700: ("size", "0")}
    names = TICK_HEADER.split(",")
    for index, (field, text) in broken.items():
        fields = rows[index].split(",")
        fields[names.index(field)] = text
        rows[index] = ",".join(fields)
    source = tmp_path / "t.csv"
    source.write_text("\n".join([TICK_HEADER, *rows]) + "\n")
    (report,) = tick_import.import_files(str(tmp_path / "lake"), [source])
    assert report.reasons == {"unparseable_price": 4, "non_positive_price": 1, "unparseable_size": 1,
                              "non_positive_size": 1}
    trades = pl.read_parquet(tmp_path / "lake" / "trades" / f"date={DAY}" / "symbol=IBM" / tick_lake.PART_FILE)
    assert trades.height == 1_000 - len(broken)
    assert trades["price"].is_finite().all() and trades["price"].min() > 0 and trades["size"].min() > 0


# ---------------------------------------------------------------------------------------------
# 2.3 Image labels
# ---------------------------------------------------------------------------------------------


@pytest.mark.reliability(case="2.3 image label out of range",
                         fault="an MNIST IDX label byte of 10 or 255 (a uint8 that parses)",
                         survives="prepare fails naming the labels file and field; no snapshot")
@pytest.mark.parametrize("label", [10, 255])
def test_idx_label_out_of_range_fails_prepare(tmp_path, label):
    written = write_mnist(tmp_path / "mnist")
    labels = written["train_labels"].copy()
    labels[13] = label
    path = tmp_path / "mnist" / idx.MNIST_FILES["train_labels"]
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DataValidationError) as err:
        image_data.prepare("mnist", tmp_path / "mnist", tmp_path / "snaps")
    assert str(err.value) == (f"{path}, field 'labels': label {label} at index 13 outside 0..9 (1 such)")
    assert not (tmp_path / "snaps").exists()


@pytest.mark.reliability(case="2.3 image label not an integer",
                         fault="a CIFAR batch label 3.7 / nan (np.int64 would truncate 3.7 to 3)",
                         survives="prepare fails naming archive!member, index and field; no snapshot")
@pytest.mark.parametrize("label", [3.7, float("nan")])
def test_cifar_float_label_fails_prepare(tmp_path, label):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    labels = [i % 10 for i in range(10)]
    labels[4] = label
    write_cifar_python(tarball, test_labels=labels)
    with pytest.raises(DataValidationError) as err:
        image_data.prepare("cifar10", tarball, tmp_path / "snaps")
    assert str(err.value) == (f"{tarball}!cifar-10-batches-py/test_batch, field 'labels': "
                              f"label {label!r} at index 4 is not an integer")
    assert not (tmp_path / "snaps").exists()
    assert np.isnan(label) or label != int(label)
