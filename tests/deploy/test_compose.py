"""docker-compose-mlops.yml: valid for Compose, complete, and consistent with dags/common/config.py.

Validation is Docker Compose's own (``docker-compose config``, see tests/deploy/compose.py): the
Compose Specification schema, and ``${VAR:?}`` interpolation against an env file.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from common import config
from tests.deploy import compose as dc
from tests.deploy.compose import COMPOSE_FILE, ENV_EXAMPLE, ROOT, ComposeError, resolve, run_config
from tools import cluster, deploy_env

RAW_TEXT = COMPOSE_FILE.read_text()
CODE = "\n".join(line for line in RAW_TEXT.splitlines() if not line.lstrip().startswith("#"))
REQUIRED = sorted(set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", CODE)))
REFERENCED = sorted(set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", CODE)))
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|JWT|_KEY$|BASIC_AUTH")


def write_compose(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "docker-compose-mlops.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


# --- Validation --------------------------------------------------------------------------------


def test_compose_file_is_valid_for_docker_compose(model):
    expected = {"postgres", "redis", "minio", "minio-init", "mlflow", "airflow-init", "airflow-apiserver",
                "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
                "airflow-worker-gpu", "flower"}
    assert set(model["services"]) == expected
    assert model["services"]["flower"]["profiles"] == ["flower"]
    assert all(not svc.get("profiles") for name, svc in model["services"].items() if name != "flower")


def test_the_schema_check_is_real(tmp_path, raw, env_file):
    """A key the Compose Specification does not define is refused (so validation did run)."""
    broken = copy.deepcopy(raw)
    broken["services"]["airflow-worker"]["queues"] = ["gpu_queue"]
    with pytest.raises(ComposeError, match="additional properties 'queues' not allowed"):
        resolve(write_compose(tmp_path, broken), env_file)
    broken = copy.deepcopy(raw)
    broken["services"]["redis"]["healthcheck"]["retries"] = "many"
    with pytest.raises(ComposeError, match="retries"):
        resolve(write_compose(tmp_path, broken), env_file)


@pytest.mark.parametrize("variable", REQUIRED)
def test_a_missing_secret_stops_compose_naming_it(tmp_path, env_file, variable):
    lines = [line for line in env_file.read_text().splitlines() if not line.startswith(f"{variable}=")]
    partial = tmp_path / "partial.env"
    partial.write_text("\n".join(lines) + "\n")
    result = run_config(COMPOSE_FILE, partial)
    assert result.returncode != 0
    assert f"required variable {variable} is missing a value" in result.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("\n".join(lines) + f"\n{variable}=\n")
    assert run_config(COMPOSE_FILE, empty).returncode != 0  # empty is as good as missing


def test_every_secret_is_required_and_interpolated_with_the_env_file(model, env_file):
    env = deploy_env.parse_env(env_file.read_text())
    secrets = [v for v in REQUIRED if SECRET_NAME.search(v)]
    assert {"AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "POSTGRES_PASSWORD", "REDIS_PASSWORD",
            "AIRFLOW_ADMIN_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MINIO_ROOT_PASSWORD"} <= set(secrets)
    text = json.dumps(model)
    for name in secrets:
        assert env[name] and env[name] in text, name
    assert "${" not in text.replace("$${", "")  # nothing left uninterpolated


# --- Secrets -----------------------------------------------------------------------------------


def test_env_example_lists_every_variable_and_holds_no_secret():
    example = deploy_env.parse_env(ENV_EXAMPLE.read_text())
    assert set(REFERENCED) <= set(example), sorted(set(REFERENCED) - set(example))
    for name in REQUIRED:
        if SECRET_NAME.search(name):
            assert example[name] == "", f"{name} has a value in .env.example"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, ".env must be git-ignored"
    tracked = subprocess.run(["git", "ls-files", ".env.example", ".env"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout.split() == [".env.example"]


def test_no_credential_is_written_in_the_compose_file(raw):
    """Each secret-looking setting is exactly a required ${VAR:?...}: no literal, no default."""
    seen = 0
    for name, svc in raw["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key) or key.endswith("_CONN") or key.endswith("_URL") and "@" in str(value):
                for match in re.finditer(r"://([^:@/]*):([^@]*)@", str(value)):  # user:password@ in URLs
                    assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*:\?[^}]*\}", match.group(2)), (name, key)
                if SECRET_NAME.search(key):
                    seen += 1
                    assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*:\?[^}]*\}", str(value)), (name, key, value)
    assert seen >= 10
    lowered = RAW_TEXT.lower()
    for weak in ("admin/admin", "admin:admin", "airflow:airflow@", "minioadmin", ":-airflow}", "_pip_additional"):
        assert weak not in lowered, weak


def test_airflow_services_share_jwt_secret_fernet_key_and_settings(model):
    assert dc.secret_problems(model) == []
    services = dc.airflow_services(model)
    assert {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer", "airflow-worker", "airflow-worker-gpu", "flower"} == set(services)
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    # docs/deployment.md: `docker exec airflow-scheduler airflow dags trigger ...`
    assert model["services"]["airflow-scheduler"]["container_name"] == "airflow-scheduler"
    assert "docker exec airflow-scheduler airflow dags trigger" in (ROOT / "docs/deployment.md").read_text()


# --- Consistency with dags/common/config.py -----------------------------------------------------


def test_the_real_file_has_no_problem(model, dag_tasks, expected_pools):
    assert {t.dag_id for t in dag_tasks} == {cfg.dag_id for cfg in config.WORKFLOWS.values()
                                              if (ROOT / "dags" / f"{cfg.dag_id}.py").is_file()}
    assert dc.all_problems(model, dag_tasks, expected_pools) == []


def test_every_queue_a_task_uses_has_a_worker(model, dag_tasks):
    workers = dc.workers(model)
    consumed = set().union(*(w["queues"] for w in workers.values()))
    used = {t.queue for t in dag_tasks}
    assert used <= consumed
    assert {cfg.queue for cfg in config.WORKFLOWS.values()} <= consumed  # a workflow not yet written too
    assert workers["airflow-worker"]["queues"] == {"default", "batch_queue", "realtime_queue"}
    assert workers["airflow-worker-gpu"]["queues"] == {"gpu_queue"}


def test_gpu_tasks_can_only_land_on_the_gpu_worker(model, dag_tasks):
    assert dc.gpu_problems(model, dag_tasks) == []
    gpu = model["services"]["airflow-worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert gpu["build"]["target"] == "gpu" and model["services"]["airflow-worker"]["build"]["target"] == "cpu"
    on_gpu = {(t.dag_id, t.task_id) for t in dag_tasks if t.queue in dc.workers(model)["airflow-worker-gpu"]["queues"]}
    assert on_gpu == {(cfg.dag_id, "train") for cfg in config.WORKFLOWS.values()
                      if cfg.pool == "gpu_pool" and (ROOT / "dags" / f"{cfg.dag_id}.py").is_file()}


def test_airflow_init_imports_every_pool_from_the_generated_file(model, dag_tasks, expected_pools):
    target, pools = dc.pools_file(model)
    assert target == "/opt/airflow/pools.json"
    generated = subprocess.run(["python3", str(ROOT / "dags/common/config.py"), "pools"],
                               capture_output=True, text=True, check=True).stdout
    assert pools == json.loads(generated) == expected_pools
    assert {t.pool for t in dag_tasks} <= set(pools)
    script = dc.unescape(" ".join(dc.command(model["services"]["airflow-init"])))
    for step in ("airflow db migrate", "airflow users create", "--role Admin", "airflow connections add mlflow_default"):
        assert step in script, step


def test_tasks_log_in_to_mlflow_as_the_service_user_that_airflow_init_sets_up(model, env_file):
    """airflow-init creates the workflows' MLflow user and their experiments and models once MLflow
    is healthy, and hands tasks that user's login; the admin's password reaches no other service."""
    assert dc.mlflow_login_problems(model) == []
    env = deploy_env.parse_env(env_file.read_text())
    init = model["services"]["airflow-init"]
    assert init["environment"]["MLFLOW_SERVICE_USERNAME"] == env["MLFLOW_SERVICE_USERNAME"] == "vtm-workflows"
    assert init["environment"]["MLFLOW_SERVICE_PASSWORD"] == env["MLFLOW_SERVICE_PASSWORD"]
    assert len(env["MLFLOW_SERVICE_PASSWORD"]) >= 32 and env["MLFLOW_SERVICE_PASSWORD"] != env["MLFLOW_ADMIN_PASSWORD"]
    assert init["depends_on"]["mlflow"]["condition"] == "service_healthy"
    for name in ("airflow-scheduler", "airflow-worker", "airflow-worker-gpu"):
        svc = model["services"][name]
        assert svc["environment"]["VTM_MLFLOW_SERVICE_USER"] == "vtm-workflows"
        assert env["MLFLOW_ADMIN_PASSWORD"] not in json.dumps(svc), name


def test_the_local_cluster_runs_the_compose_files_workers(raw):
    """tools/cluster.py (the Celery cluster test) starts exactly these workers."""
    specs = {w.service: w for w in cluster.compose_workers(raw)}
    assert set(specs) == {"airflow-worker", "airflow-worker-gpu"}
    assert specs["airflow-worker-gpu"].gpu and specs["airflow-worker-gpu"].queues == ("gpu_queue",)
    assert specs["airflow-worker-gpu"].concurrency == 1
    assert not specs["airflow-worker"].gpu and specs["airflow-worker"].concurrency == 4


def test_each_worker_tells_its_tasks_its_concurrency(raw):
    """A task sizes its threads to cores // the worker's concurrency (dags/scripts/core/threads.py), and
    a task process cannot see the worker's --concurrency flag: the environment says the same."""
    for spec in cluster.compose_workers(raw):
        env = raw["services"][spec.service]["environment"]
        assert "AIRFLOW__CELERY__WORKER_CONCURRENCY" in env, spec.service
        assert int(cluster._default_of(str(env["AIRFLOW__CELERY__WORKER_CONCURRENCY"]))) == spec.concurrency


# --- Ports, volumes, services ------------------------------------------------------------------


def test_ports_and_volumes_are_consistent(model):
    assert dc.port_problems(model) == []
    assert dc.volume_problems(model) == []
    published = {name: [(p["host_ip"], p["published"], p["target"]) for p in svc.get("ports") or []]
                 for name, svc in model["services"].items() if svc.get("ports")}
    assert published["airflow-apiserver"] == [("127.0.0.1", "8080", 8080)]
    assert published["mlflow"] == [("127.0.0.1", "5000", 5000)]
    assert set(published) == {"airflow-apiserver", "mlflow", "minio", "flower"}  # not the DB or broker


def test_health_checks_and_start_order(model):
    services = model["services"]
    for name, svc in services.items():
        if svc.get("restart") == "always":
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            if cond["condition"] == "service_healthy":
                assert services[dep].get("healthcheck"), (name, dep)
            elif cond["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", (name, dep)
    for name in dc.airflow_services(model):
        if name != "airflow-init":
            assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    for worker in ("airflow-worker", "airflow-worker-gpu"):  # warm shutdown
        assert services[worker]["environment"]["DUMB_INIT_SETSID"] == "0"
        assert services[worker]["stop_grace_period"] == "10m0s"


def test_mlflow_server_postgres_store_s3_artifacts_and_basic_auth(model):
    services = model["services"]
    mlflow = services["mlflow"]
    args = dc.command(mlflow)
    assert args[:2] == ["mlflow", "server"] and "--serve-artifacts" in args
    assert dc.flag(args, "--app-name") == "basic-auth"
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:")
    airflow_db = services["airflow-scheduler"]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    databases = {uri.rsplit("/", 1)[1] for uri in (env["MLFLOW_BACKEND_STORE_URI"], airflow_db)}
    assert databases == {"mlflow", "airflow"}  # separate databases
    init_sql = dc.unescape(model["configs"]["postgres-init"]["content"])
    for database in databases:
        assert f"CREATE DATABASE {database} " in init_sql
    # Buckets: MLflow's artifacts and the tick lake exist before anything uses them.
    created = set(re.findall(r"local/([a-z0-9-]+)", " ".join(dc.command(services["minio-init"]))))
    assert dc.flag(args, "--artifacts-destination").removeprefix("s3://") in created
    lake = services["airflow-worker"]["environment"]["TICK_LAKE"]
    assert lake.startswith("s3://") and lake.removeprefix("s3://").split("/")[0] in created
    assert re.fullmatch(r"minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", services["minio"]["image"])
    assert re.fullmatch(r"minio/mc:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", services["minio-init"]["image"])


# --- The checks fail when the file loses a queue, a pool or a secret ---------------------------


def drop_queue(doc: dict, queue: str) -> None:
    svc = doc["services"]["airflow-worker"]
    svc["command"] = svc["command"].replace(f",{queue}", "").replace(f"{queue},", "")


def drop_pool(doc: dict, pool: str) -> None:
    pools = json.loads(doc["configs"]["airflow-pools"]["content"])
    del pools[pool]
    doc["configs"]["airflow-pools"]["content"] = json.dumps(pools, indent=2)


def set_env(service: str, key: str, value: str | None):
    def change(doc: dict) -> None:
        env = doc["services"][service]["environment"] = dict(doc["services"][service]["environment"])
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    return change


def set_command(service: str, old: str, new: str):
    def change(doc: dict) -> None:
        doc["services"][service]["command"] = doc["services"][service]["command"].replace(old, new)
    return change


def set_init_script(old: str, new: str):
    def change(doc: dict) -> None:
        svc = doc["services"]["airflow-init"]
        svc["command"] = [part.replace(old, new) for part in svc["command"]]
    return change


MUTATIONS = {
    "realtime_queue removed": (lambda d: drop_queue(d, "realtime_queue"), "queue realtime_queue has no worker"),
    "batch_queue removed": (lambda d: drop_queue(d, "batch_queue"), "queue batch_queue has no worker"),
    "default removed": (lambda d: drop_queue(d, "default"), "queue default has no worker"),
    "gpu_pool removed": (lambda d: drop_pool(d, "gpu_pool"), "pool gpu_pool is not in the pools file"),
    "high_priority_cpu removed": (lambda d: drop_pool(d, "high_priority_cpu"),
                                  "pool high_priority_cpu is not in the pools file"),
    "model_registry removed": (lambda d: drop_pool(d, "model_registry"), "pool model_registry is not in"),
    "JWT secret removed from the scheduler": (
        set_env("airflow-scheduler", "AIRFLOW__API_AUTH__JWT_SECRET", None),
        "AIRFLOW__API_AUTH__JWT_SECRET is not set for airflow-scheduler"),
    "own JWT secret on the GPU worker": (
        set_env("airflow-worker-gpu", "AIRFLOW__API_AUTH__JWT_SECRET", "${REDIS_PASSWORD:?}"),
        "AIRFLOW__API_AUTH__JWT_SECRET differs"),
    "Fernet key removed from the API server": (
        set_env("airflow-apiserver", "AIRFLOW__CORE__FERNET_KEY", None),
        "AIRFLOW__CORE__FERNET_KEY is not set for airflow-apiserver"),
    "GPU worker takes the default queue": (
        set_command("airflow-worker-gpu", "--queues gpu_queue", "--queues gpu_queue,default"),
        "GPU worker airflow-worker-gpu also consumes ['default']"),
    "CPU worker takes gpu_queue": (
        set_command("airflow-worker", "--queues default", "--queues gpu_queue,default"),
        "worker airflow-worker has no GPU but consumes ['gpu_queue']"),
    "GPU worker runs two at once": (
        set_command("airflow-worker-gpu", "--concurrency 1", "--concurrency 2"), "runs 2 tasks at once"),
    "execution API on a wrong port": (
        set_env("airflow-worker", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "http://airflow-apiserver:8081/execution/"),
        "airflow-apiserver does not declare port 8081"),
    "tasks log in to MLflow as the admin": (
        set_init_script('--conn-login "$$MLFLOW_SERVICE_USERNAME" --conn-password "$$MLFLOW_SERVICE_PASSWORD"',
                        '--conn-login "$$MLFLOW_ADMIN_USERNAME" --conn-password "$$MLFLOW_ADMIN_PASSWORD"'),
        "mlflow_default connection does not log in as the workflows' service user"),
    "no MLflow bootstrap": (
        set_init_script("python -m common.mlflow_identity bootstrap --tracking-uri http://mlflow:5000", ""),
        "airflow-init does not run `python -m common.mlflow_identity bootstrap`"),
    "the MLflow admin's password on the worker": (
        set_env("airflow-worker", "MLFLOW_TRACKING_PASSWORD", "${MLFLOW_ADMIN_PASSWORD:?}"),
        "airflow-worker holds the MLflow admin's password"),
    "people may write by default": (
        lambda d: d["configs"]["mlflow-auth"].update(
            content=d["configs"]["mlflow-auth"]["content"].replace("= READ", "= EDIT")),
        "does not give users other than the owner READ by default"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_checks_fail_when_the_file_loses_a_queue_pool_or_secret(
        tmp_path, raw, env_file, dag_tasks, expected_pools, mutation):
    change, expected = MUTATIONS[mutation]
    document = copy.deepcopy(raw)
    change(document)
    model = resolve(write_compose(tmp_path, document), env_file)
    problems = dc.all_problems(model, dag_tasks, expected_pools)
    assert any(expected in p for p in problems), problems


def test_a_removed_secret_variable_stops_compose(tmp_path, raw, env_file):
    """Secrets removed from .env never reach a container with an empty value."""
    lines = [x for x in env_file.read_text().splitlines() if not x.startswith("AIRFLOW_JWT_SECRET=")]
    (tmp_path / "no-jwt.env").write_text("\n".join(lines) + "\n")
    with pytest.raises(ComposeError, match="required variable AIRFLOW_JWT_SECRET is missing a value"):
        resolve(COMPOSE_FILE, tmp_path / "no-jwt.env")
