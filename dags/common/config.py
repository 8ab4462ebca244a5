"""The single source of truth for the four workflows.

Every setting a workflow needs - its schedule, where it runs (pool, queue), how it retries, which
MLflow experiment and registered model it writes to, and how its champion is gated - lives in
``WORKFLOWS`` below. DAG files read it, ``airflow pools import`` reads the pools file generated from
it (``python dags/common/config.py pools``), and the docs and compose checks read it too.

This module is imported by DAG files at parse time, so it must stay standard-library only.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

if not __package__:  # run as a file (`python dags/common/config.py pools`): dags/ is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.core.params import ParamSpec, integer, number  # noqa: E402 - after the path fix above


@dataclass(frozen=True)
class PromotionGate:
    """When a registered challenger may take the ``champion`` alias.

    ``metric`` is compared with the current champion's score on the same evaluation data: the
    challenger must be better by at least ``min_improvement`` (relative, 0.01 = 1 %).
    ``threshold_metric`` must independently pass the absolute ``threshold`` (``>=`` when
    ``threshold_greater_is_better``, else ``<=``). With ``require_approval`` a passing challenger
    waits for a person (``python -m common.registry approve``) instead of being promoted.
    """

    metric: str
    greater_is_better: bool
    threshold_metric: str
    threshold: float
    threshold_greater_is_better: bool = True
    min_improvement: float = 0.0
    require_approval: bool = False

    def better(self, challenger: float, champion: float) -> bool:
        """True when ``challenger`` beats ``champion`` by the configured relative margin."""
        margin = abs(champion) * self.min_improvement
        if self.greater_is_better:
            return challenger > champion + margin
        return challenger < champion - margin

    def passes_threshold(self, value: float) -> bool:
        if self.threshold_greater_is_better:
            return value >= self.threshold
        return value <= self.threshold


# ---------------------------------------------------------------------------------------------
# Run parameters. Power and tick: one spec per field of the trainer's ModelParams (which a person
# may tune per run); its default must equal the dataclass's - the trainer's dataclass stays the
# truth that the CLI, benchmarks and tests construct without Airflow, and config.py cannot import
# it (numpy). tests/dags/test_dag_integrity.py fails, naming the field, when the two drift.
# ---------------------------------------------------------------------------------------------

# Bounds are those of the library underneath (LightGBM, XGBoost) or of the data: a value outside
# them either fails deep inside training (and used to be retried) or trains a useless model.
POWER_PARAMS: tuple[ParamSpec, ...] = (
    integer("eval_weeks", 8, "Final weeks held out: model, baselines and champion are scored "
         "walk-forward on them", minimum=1, maximum=104),
    integer("validation_weeks", 8, "Weeks before the evaluation window used for early stopping",
         minimum=1, maximum=104),
    integer("num_boost_round", 2000, "Most boosting rounds (early stopping usually ends sooner)",
         minimum=1, maximum=100000),
    number("learning_rate", 0.03, "LightGBM shrinkage per round", above=0, maximum=1),
    integer("num_leaves", 63, "Leaves per tree", minimum=2, maximum=131072),
    integer("min_data_in_leaf", 40, "Fewest hourly rows in a leaf", minimum=1),
    number("feature_fraction", 0.5, "Share of features sampled per tree", above=0, maximum=1),
    number("bagging_fraction", 0.8, "Share of rows sampled per iteration", above=0, maximum=1),
    number("lambda_l2", 10.0, "L2 regularisation of leaf values", minimum=0),
    integer("early_stopping_rounds", 100, "Stop after this many rounds without a better "
         "validation MAE", minimum=1),
    integer("seed", 7, "Random seed (ensemble member i uses seed + i)", minimum=0),
    integer("ensemble_size", 3, "Boosters refit with different seeds and averaged into one",
         minimum=1, maximum=20),
    integer("num_threads", 0, "Most LightGBM threads, within the task's thread budget "
         "(scripts/core/threads.py); 0: the whole budget", minimum=0, maximum=256),
)

TICK_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("trade_date", "string", None, "Trading day to process (YYYY-MM-DD); null: the "
              "run's logical date (its UTC calendar day)", format="date"),
    number("max_bad_share", 0.02, "Largest share of a symbol's rows the importer may have "
            "quarantined before validate fails the day", minimum=0, maximum=1),
    integer("train_days", 20, "Rolling window of past trading days to train on", minimum=1, maximum=2520),
    integer("max_depth", 1, "XGBoost tree depth (1: an additive correction of HAR)", minimum=1, maximum=16),
    number("learning_rate", 0.02, "XGBoost shrinkage (eta) per round", above=0, maximum=1),
    integer("num_boost_round", 2000, "Most boosting rounds (early stopping usually ends sooner)",
         minimum=1, maximum=100000),
    integer("early_stopping_rounds", 200, "Stop after this many rounds without a better "
         "validation RMSE", minimum=1),
    number("min_child_weight", 50.0, "Least hessian weight in a leaf", minimum=0),
    number("subsample", 0.8, "Share of rows sampled per tree", above=0, maximum=1),
    number("colsample_bytree", 0.8, "Share of features sampled per tree", above=0, maximum=1),
    number("reg_lambda", 5.0, "L2 regularisation of leaf weights", minimum=0),
    integer("seed", 7, "Random seed", minimum=0),
    integer("nthread", 0, "Most XGBoost threads, within the task's thread budget "
         "(scripts/core/threads.py); 0: the whole budget", minimum=0, maximum=256),
)

# The image workflows: scripts.image.base.TrainConfig's fields (the data set aside, fixed by
# the DAG). PROFILES and FRAMEWORKS must match scripts.image.base's (the integrity test checks).
AUTO_PROMOTE = ParamSpec(
    "auto_promote", "boolean", None, "Promote a challenger that passes the gate without waiting for "
    "a person's approval; null: the workflow's setting (off unless configured)")

IMAGE_PROFILES = ("smoke", "fast", "quality")
IMAGE_FRAMEWORKS = ("pytorch", "tensorflow")
IMAGE_DEVICES = ("auto", "cpu", "cuda")


def _image_params() -> tuple[ParamSpec, ...]:
    return (
        ParamSpec("profile", "string", "fast", "How much work: smoke (2,000 images, 2 epochs, CPU, "
                  "never promoted), fast or quality (the real recipes)", enum=IMAGE_PROFILES),
        ParamSpec("framework", "string", "pytorch", "Trainer: PyTorch or Keras 3 (TensorFlow)",
                  enum=IMAGE_FRAMEWORKS),
        integer("epochs", None, "Epochs; null: the profile's", minimum=1, maximum=1000),
        integer("batch_size", None, "Images per batch; null: the profile's", minimum=1, maximum=65536),
        number("learning_rate", None, "Peak of the one-cycle schedule; null: the recipe's",
                above=0, maximum=10),
        integer("seed", 0, "Random seed (initialisation, shuffling, the smoke subset)", minimum=0),
        ParamSpec("device", "string", "auto", "Where training runs: auto (CUDA when there is one), "
                  "cpu or cuda (fails without a GPU)", enum=IMAGE_DEVICES),
    )


def to_param(spec: ParamSpec) -> Any:
    """A run parameter as a typed ``airflow.sdk.Param`` (imported here: config.py is stdlib-only
    at import time, and scripts/ never imports Airflow)."""
    from airflow.sdk import Param

    return Param(spec.default, description=spec.description, **spec.schema())


@dataclass(frozen=True)
class Pool:
    name: str
    slots: int
    description: str


@dataclass(frozen=True)
class WorkflowConfig:
    dag_id: str
    description: str
    schedule: str | None
    pool: str
    queue: str
    experiment: str
    model_name: str
    gate: PromotionGate
    pool_slots: int = 1
    priority_weight: int = 1
    max_active_runs: int = 1
    retries: int = 2
    retry_delay: timedelta = timedelta(minutes=2)
    execution_timeout: timedelta = timedelta(hours=1)
    owner: str = "ml-platform"
    # Where the non-training tasks (prepare, evaluate, register) run, when not where training does.
    support_pool: str | None = None
    support_queue: str | None = None
    # The schedule is read in this zone (dawn in Paris, the close in New York), not in UTC.
    timezone: str = "UTC"
    start_date: str = "2026-01-01"
    tags: tuple[str, ...] = ()
    # Every run parameter a person may set (trigger form, REST API, CLI conf): typed, bounded,
    # described. Become the DAG's Params; a run's conf with any other key fails before prepare.
    run_params: tuple[ParamSpec, ...] = ()
    # For workflows that wait for their input (the tick lake): how often to look, and for how long.
    poke_interval: timedelta = timedelta(minutes=5)
    data_wait: timedelta = timedelta(hours=6)
    # Governance (docs/operations.md). A challenger that passes the gate waits for a person's
    # approval in the Airflow UI unless ``auto_promote`` (also a run parameter of the same name);
    # no answer within ``approval_timeout`` counts as a rejection.
    auto_promote: bool = False
    approval_timeout: timedelta = timedelta(hours=24)
    # When the run's decision must be made: ``deadline`` after the run's logical date (its
    # scheduled time) or, for ``deadline_reference="queued_at"``, after it was queued. Every
    # workflow counts from queued_at: a scheduled run is queued at its scheduled time, and a run
    # created late (the catch-up run that unpausing creates, a backfill of old days, an
    # asset-triggered run, which has no logical date) would otherwise miss its deadline at birth;
    # Airflow 3.3.2's scheduler was seen to crash on such a run (StaleDataError on the deadline
    # table, SQLite) while its tasks ran.
    deadline: timedelta | None = None
    deadline_reference: str = "logical_date"
    # Champion health: notify when the champion's score on the newest window is worse than the
    # score it was promoted with by more than this share (0.2 = 20 %).
    health_tolerance: float = 0.2
    # Data-aware schedule: the name of an Airflow Asset whose events also start a run (besides
    # ``schedule``, whichever comes first).
    trigger_asset: str | None = None

    @property
    def params(self) -> dict[str, object]:
        """Each run parameter's default, by name."""
        return {spec.name: spec.default for spec in self.run_params}

    def param_spec(self, name: str) -> ParamSpec:
        for spec in self.run_params:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.dag_id} has no run parameter {name!r}; known: {sorted(self.params)}")

    def default_args(self) -> dict[str, object]:
        """Task defaults for the DAG: where tasks run and how they retry."""
        return {
            "owner": self.owner,
            "pool": self.support_pool or self.pool,
            "pool_slots": 1 if self.support_pool else self.pool_slots,
            "queue": self.support_queue or self.queue,
            "priority_weight": self.priority_weight,
            "retries": self.retries,
            "retry_delay": self.retry_delay,
            "execution_timeout": self.execution_timeout,
        }


    def dag_kwargs(self) -> dict[str, object]:
        """Everything a workflow's ``@dag`` takes from here (the DAG file adds its ``doc_md``)."""
        import pendulum  # Airflow's own dependency, already imported by airflow.sdk

        from common import alerts

        return {
            "dag_id": self.dag_id,
            "description": self.description,
            "schedule": self.timetable(),
            "start_date": pendulum.parse(self.start_date, tz=self.timezone),
            "catchup": False,
            "max_active_runs": self.max_active_runs,
            "default_args": {**self.default_args(), **alerts.task_callbacks()},
            "on_success_callback": alerts.on_success,
            # A run not finished by its deadline notifies every channel (triggerer; alerts.py).
            "deadline": alerts.deadline_alert(self.deadline_interval(), self.deadline_reference),
            # Typed Params: the trigger form shows each with its default and description, and
            # Airflow validates a run's conf against their schema when the run is created.
            "params": {spec.name: to_param(spec) for spec in self.run_params},
            "tags": list(self.tags),
        }

    def timetable(self) -> object:
        """The DAG's ``schedule``: the cron (a ``CronTriggerTimetable`` in ``timezone``, what Airflow
        makes of a cron string) or, with ``trigger_asset``, that cron or the Asset's next event,
        whichever comes first (Airflow's ``AssetOrTimeSchedule``). Built here, when a DAG file asks
        (Airflow imported lazily: this module stays standard-library only at import time)."""
        if self.trigger_asset is None:
            return self.schedule
        from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

        if self.schedule is None:
            return [Asset(self.trigger_asset)]
        return AssetOrTimeSchedule(timetable=CronTriggerTimetable(self.schedule, timezone=self.timezone),
                                   assets=[Asset(self.trigger_asset)])

    def approval_response_timeout(self) -> timedelta:
        """How long the approval step waits for a person: ``approval_timeout``, or
        ``VTM_APPROVAL_TIMEOUT_SECONDS`` from the environment the DAGs are parsed in (tests, demos)."""
        seconds = os.environ.get("VTM_APPROVAL_TIMEOUT_SECONDS", "").strip()
        return timedelta(seconds=float(seconds)) if seconds else self.approval_timeout

    def train_task_args(self) -> dict[str, object]:
        """Where the training task runs (the GPU for the CNNs)."""
        return {"pool": self.pool, "pool_slots": self.pool_slots, "queue": self.queue}

    def deadline_interval(self) -> timedelta | None:
        """How long after ``deadline_reference`` a run must be done: ``deadline``, or for every
        workflow ``VTM_DEADLINE_SECONDS`` from the environment the DAGs are parsed in (tests,
        drills of the alert path); None: no deadline."""
        seconds = os.environ.get("VTM_DEADLINE_SECONDS", "").strip()
        return timedelta(seconds=float(seconds)) if seconds else self.deadline


def _weekly_if_enabled(cron: str) -> str | None:
    """CNN workflows are manual unless VTM_CNN_WEEKLY=1 turns their weekly retrain on."""
    return cron if os.environ.get("VTM_CNN_WEEKLY", "").lower() in ("1", "true", "yes") else None


def _image_workflow(dataset: str, name: str, min_accuracy: float, weekday: int) -> WorkflowConfig:
    return WorkflowConfig(
        dag_id=f"{name}_cnn_training",
        description=f"{dataset} image classifier (PyTorch or Keras CNN), GPU-routed training",
        schedule=_weekly_if_enabled(f"0 2 * * {weekday}"),
        pool="gpu_pool",
        queue="gpu_queue",
        support_pool="default_pool",
        support_queue="default",
        experiment=f"{name}-cnn",
        model_name=f"{name}_cnn",
        priority_weight=3,
        retries=2,
        execution_timeout=timedelta(hours=2),
        tags=("vision", "cnn", name),
        gate=PromotionGate(
            metric="test_accuracy",
            greater_is_better=True,
            threshold_metric="test_accuracy",
            threshold=min_accuracy,  # on the full test set; smoke runs never promote
            require_approval=False,
        ),
        run_params=(*_image_params(), AUTO_PROMOTE),
        deadline=timedelta(hours=6),  # manual or weekly: decided within 6 h of being queued
        deadline_reference="queued_at",
    )


# Register tasks of every workflow share this one-slot pool, so two runs (of any DAG, on any
# worker) never decide a promotion at the same time; registry.py also locks and re-checks.
REGISTRY_POOL = Pool("model_registry", 1, "Serialises champion promotion across all workflows")

POOLS: tuple[Pool, ...] = (
    Pool("gpu_pool", 1, "One GPU: CNN training tasks, one at a time"),
    Pool("high_priority_cpu", 2, "Latency-sensitive tick model work"),
    Pool("default_pool", 4, "Batch CPU work"),
    REGISTRY_POOL,
)

WORKFLOWS: dict[str, WorkflowConfig] = {
    cfg.dag_id: cfg
    for cfg in (
        WorkflowConfig(
            dag_id="power_lgbm_training",
            description="Day-ahead household power forecast (LightGBM) on the UCI data",
            schedule="30 5 * * *",  # daily at dawn, after the night's readings have landed
            timezone="Europe/Paris",  # the household is in Sceaux, near Paris
            pool="default_pool",
            queue="batch_queue",
            experiment="power-forecast",
            model_name="power_lgbm",
            priority_weight=2,
            execution_timeout=timedelta(minutes=30),
            tags=("forecasting", "lightgbm", "power"),
            gate=PromotionGate(
                metric="mae",
                greater_is_better=False,
                threshold_metric="skill_mae",
                threshold=0.10,  # at least 10 % better than the best seasonal-naive baseline
                min_improvement=0.0,
                require_approval=False,
            ),
            run_params=(*POWER_PARAMS, AUTO_PROMOTE),
            deadline=timedelta(hours=2),  # queued at 05:30: the day's forecast is decided by 07:30
            deadline_reference="queued_at",
        ),
        WorkflowConfig(
            dag_id="tick_model_training",
            description="Next-5-minute realized volatility of US equities (HAR + XGBoost) from the tick lake",
            schedule="30 17 * * 1-5",  # weekdays after the 16:00 close, once the day's trades land
            timezone="America/New_York",
            start_date="2013-01-01",  # backfills may reach into the lake's history
            pool="high_priority_cpu",
            queue="realtime_queue",
            experiment="tick-production",
            model_name="tick_model",
            priority_weight=10,  # the highest of the four: its window closes at the next open
            max_active_runs=1,
            retries=2,
            retry_delay=timedelta(minutes=1),
            execution_timeout=timedelta(minutes=20),
            tags=("tick", "volatility", "xgboost"),
            gate=PromotionGate(
                metric="rmse_log_rv",
                greater_is_better=False,
                threshold_metric="skill_vs_har",
                threshold=0.0,  # no worse than the HAR-RV baseline (which itself beats persistence)
                require_approval=False,
            ),
            run_params=(*TICK_PARAMS, AUTO_PROMOTE),
            deadline=timedelta(hours=16),  # queued at 17:30 + 16 h: before the next 09:30 open
            deadline_reference="queued_at",
            trigger_asset="tick_lake_trades",  # the importer's event for a completed trade day
            poke_interval=timedelta(minutes=5),
            data_wait=timedelta(hours=6),
        ),
        _image_workflow("MNIST", "mnist", 0.99, weekday=6),
        _image_workflow("CIFAR-10", "cifar10", 0.90, weekday=6),
    )
}


def get(dag_id: str) -> WorkflowConfig:
    try:
        return WORKFLOWS[dag_id]
    except KeyError:
        raise KeyError(f"no workflow config for dag_id {dag_id!r}; known: {sorted(WORKFLOWS)}") from None


def pools_file_content() -> dict[str, dict[str, object]]:
    """The JSON document ``airflow pools import`` reads."""
    return {
        p.name: {"slots": p.slots, "description": p.description, "include_deferred": False}
        for p in POOLS
    }


def params_table() -> str:
    """Markdown: every workflow's run parameters (docs/operations.md, "What each parameter accepts")."""
    lines = []
    for cfg in WORKFLOWS.values():
        lines += [f"**`{cfg.dag_id}`**", "", "| parameter | accepts | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{s.name}` | {s.accepts()} | `{json.dumps(s.default)}` | {s.description} |"
                  for s in cfg.run_params]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[1:2] == ["params-table"]:
        print(params_table())
        return 0
    if argv[1:2] == ["pools"]:
        json.dump(pools_file_content(), sys.stdout, indent=2)
        print()
        return 0
    if argv[1:2] == ["dag-ids"]:
        print(" ".join(WORKFLOWS))
        return 0
    print("usage: config.py pools|dag-ids|params-table", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
